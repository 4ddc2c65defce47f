"""`ray-mmd export`: a checkpoint -> one torch.export file (.pt2) that runs with plain torch.

The exported program includes the normalisation the model was trained with, so a user feeds it raw
images: input N x 6 x S x S float32 in [0, 1] (fg_bg RGB then bg RGB, resized to the stage size S);
output N x 2 x S x S raw (channel 0 mask logits, channel 1 depth logits: sigmoid gives the mask
probability and the depth in [0, 1], brighter = nearer). The batch size is dynamic. Model name, width,
stage size and stats ride along as the extra file `ray_mmd.json`, so `--checkpoint FILE.pt2` works for
eval and predict too. Load without ray-mmd::

    ep = torch.export.load("model.pt2"); out = ep.module()(x)
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import torch

from ray_mmd import storage
from ray_mmd.errors import UserError
from ray_mmd.infer import EXPORT_META, load_model

log = logging.getLogger("ray_mmd.export")

USAGE = (
    "ep = torch.export.load(path); out = ep.module()(x)  # x: N x 6 x S x S float in [0,1] (fg_bg RGB, bg RGB); "
    "out[:, 0] mask logits, out[:, 1] depth logits (sigmoid -> [0,1], brighter = nearer)"
)


def export_model(
    checkpoint: str, out: str, model: str | None = None, width: int | None = None
) -> dict[str, Any]:
    """Export the checkpoint's model (+ its normalisation) to `out`; returns the metadata stored with it."""
    loaded = load_model(checkpoint, model=model, width=width)
    if loaded.stats_from == "export":
        raise UserError(f"{checkpoint} is already an exported file: export from a run or checkpoint dir")
    net = loaded.net.eval()
    s = loaded.size
    example = torch.rand(2, 6, s, s)
    batch = torch.export.Dim("batch", min=1, max=65536)
    ep = torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
    meta = {
        "model": loaded.name,
        "width": loaded.width,
        "image_size": s,
        "stats": loaded.stats,
        "source": loaded.source,
        "step": loaded.meta.get("step"),
        "stage": loaded.meta.get("stage"),
        "usage": USAGE,
    }
    buf = io.BytesIO()
    torch.export.save(ep, buf, extra_files={EXPORT_META: json.dumps(meta)})
    try:
        storage.write_bytes_atomic(out, buf.getvalue())
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot write {out!r} ({type(e).__name__}): choose another --out") from None
    log.info("exported %s (%s width %d, %dx%d) to %s", loaded.source, loaded.name, loaded.width, s, s, out)
    return meta
