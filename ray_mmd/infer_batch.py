"""Batch prediction on Ray Data: a packed dataset or a folder of fg_bg/bg pairs (local or gs://) -> PNGs.

`map_batches` with an actor pool: each actor loads the model once and writes its outputs itself, each
file atomically, as soon as its batch is done, so a killed run loses nothing it wrote. A re-run lists the
output location once and skips every input whose outputs are all there (the last file written,
depth_color, marks a complete set). GPUs are used when the cluster has them; the pool size comes from the
cluster's resources.

Inputs. A packed dataset (a manifest.json): every sample (or one split), named OUT/<sample_id>_*.png.
A folder: URL/fg_bg/NAME.jpg paired by name with URL/bg/NAME.jpg, or with the single image in URL/bg/
(one scene, many photos); named OUT/NAME_*.png.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from ray_mmd import storage
from ray_mmd.errors import UserError
from ray_mmd.infer import IMAGE_EXTS, OUTPUT_SUFFIXES, check_writable, load_model

log = logging.getLogger("ray_mmd.infer")


def _images(url: str) -> dict[str, str]:
    """{stem: url} of the image files directly in a folder (empty if it is missing)."""
    fs, path = storage.filesystem(url)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return {}
    out = {}
    for e in sorted(entries):
        name = e.rstrip("/").rsplit("/", 1)[-1]
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTS:
            out[stem] = storage.join(url, name)
    return out


def folder_items(url: str) -> list[dict[str, str]]:
    """[{key, fg, bg}] for URL/fg_bg + URL/bg; one-line errors for an empty folder or a missing bg."""
    fgs = _images(storage.join(url, "fg_bg"))
    if not fgs:
        raise UserError(
            f"no fg_bg images in {storage.join(url, 'fg_bg')!r}: put pairs as fg_bg/NAME.jpg + bg/NAME.jpg "
            "(or a packed dataset) there"
        )
    bgs = _images(storage.join(url, "bg"))
    if len(bgs) == 1:
        only = next(iter(bgs.values()))
        return [{"key": k, "fg": v, "bg": only} for k, v in fgs.items()]
    missing = [k for k in fgs if k not in bgs]
    if missing:
        raise UserError(
            f"{len(missing)} fg_bg images have no bg of the same name in {storage.join(url, 'bg')!r} "
            f"(first: {missing[0]}): add them, or leave exactly one bg image for all"
        )
    return [{"key": k, "fg": v, "bg": bgs[k]} for k, v in fgs.items()]


def done_keys(out: str) -> set[str]:
    """Inputs whose outputs are all written; leftovers of writes cut short by a kill are removed."""
    fs, path = storage.filesystem(out)
    try:
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return set()
    for n in names:
        if ".tmp-" in n:  # write_bytes_atomic's temp file of a killed writer: never a finished output
            storage.remove(storage.join(out, n))
    have = set(names)
    last = f"_{OUTPUT_SUFFIXES[-1]}"
    keys = {n[: -len(last)] for n in names if n.endswith(last)}
    return {k for k in keys if all(f"{k}_{s}" in have for s in OUTPUT_SUFFIXES)}


def packed_key(sample_id: int) -> str:
    return f"{int(sample_id):09d}"


class PredictActor:
    """One per pool slot: loads the model once; each call predicts a batch and writes its outputs."""

    def __init__(self, checkpoint: str, out: str, data: str | None, sleep_s: float = 0.0) -> None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.loaded = load_model(checkpoint, device=device)
        self.out, self.sleep_s, self.bg, self.shard_url = out, sleep_s, None, None
        if data:  # packed: bg images by id, decoded once per actor
            from ray_mmd.data import manifest as mf
            from ray_mmd.infer import bg_table, decode_rgb

            _, _, blobs = bg_table(mf.load(data), self.loaded.size)
            self.bg = {b: decode_rgb(d, self.loaded.size, f"bg {b}") for b, d in blobs.items()}

    def _packed_row(self, shard: str, sample_id: int) -> tuple[bytes, int]:
        """(fg_bg bytes, bg_id) of a packed sample; the last shard read stays cached in the actor."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.shard_url != shard:
            t = pq.read_table(
                pa.BufferReader(storage.read_bytes(shard)), columns=["sample_id", "fg_bg", "bg_id"]
            )
            ids = t.column("sample_id").to_numpy()
            self.shard_url = shard
            self.rows = {int(i): j for j, i in enumerate(ids)}
            self.fg_col, self.bg_col = t.column("fg_bg"), t.column("bg_id").to_numpy()
        if sample_id not in self.rows:
            raise UserError(f"sample {sample_id} is not in {shard} (quarantined when packed)")
        j = self.rows[sample_id]
        return self.fg_col[j].as_py(), int(self.bg_col[j])

    def _pair(self, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        from ray_mmd.infer import decode_rgb

        s = self.loaded.size
        if self.bg is not None:
            fg_bytes, bg_id = self._packed_row(str(row["shard"]), int(row["sample_id"]))
            fg, size = decode_rgb(fg_bytes, s, f"sample {row['sample_id']}")
            return fg, self.bg[bg_id][0], size
        fg, size = decode_rgb(storage.read_bytes(row["fg"]), s, row["fg"])
        bg, bg_size = decode_rgb(storage.read_bytes(row["bg"]), s, row["bg"])
        if bg_size != size:
            raise UserError(f"fg_bg {row['fg']} is {size} but bg {row['bg']} is {bg_size}")
        return fg, bg, size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ray_mmd.infer import predict_arrays, prediction_pngs, write_outputs

        n = len(next(iter(batch.values())))
        rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]
        keys = [packed_key(r["sample_id"]) if self.bg is not None else str(r["key"]) for r in rows]
        ok, pairs = [], []
        for key, r in zip(keys, rows, strict=True):
            try:
                pairs.append(self._pair(r))
                ok.append(key)
            except UserError as e:  # one bad file does not stop the batch: reported on the driver
                log.warning("skipped %s: %s", key, e)
        if pairs:
            preds = predict_arrays(self.loaded, *(list(p) for p in zip(*pairs, strict=True)))
            for key, (prob, depth) in zip(ok, preds, strict=True):
                write_outputs(self.out, key, prediction_pngs(prob, depth))
        if self.sleep_s:
            time.sleep(self.sleep_s)  # tests: slow a run down enough to kill it midway
        return {"key": np.array(keys), "written": np.array([k in ok for k in keys])}


def _connect() -> None:
    import ray

    if ray.is_initialized():
        return
    env = {
        k: os.environ.get(k)
        for k in ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "PYTHONPATH")
    }
    env = {k: v for k, v in env.items() if v}
    address = os.environ.get("RAY_ADDRESS")
    kw: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=False, **kw)


def _inputs(input_url: str, done: set[str], split: str) -> tuple[list[dict[str, Any]], str | None]:
    """(the inputs still to do as rows, the packed data root or None); found before Ray starts."""
    from ray_mmd.data import manifest as mf

    if storage.exists(storage.join(input_url, mf.MANIFEST_NAME)):
        man = mf.load(input_url)
        items = []
        for shard in man.shards:
            for i in range(shard.first_id, shard.last_id + 1):
                items.append({"key": packed_key(i), "sample_id": i, "shard": man.url(shard.path)})
        wanted = {packed_key(i) for i in man.sample_ids(split)}
        items = [it for it in items if it["key"] in wanted and it["key"] not in done]
        return items, input_url
    return [it for it in folder_items(input_url) if it["key"] not in done], None


def batch_predict(
    checkpoint: str,
    input_url: str,
    out: str,
    batch_size: int = 16,
    split: str = "all",
    concurrency: int | None = None,
    progress: bool = True,
    sleep_s: float = 0.0,
) -> dict[str, int]:
    """Predict every input not yet written under `out`; returns {"inputs", "skipped", "written", "failed"}."""
    import ray

    storage.require(input_url, "input")
    loaded = load_model(checkpoint)  # a bad checkpoint is found here, before Ray starts
    check_writable(out)
    done = done_keys(out)
    items, data_root = _inputs(input_url, done, split)
    n = len(items)
    if not n:
        log.info("nothing to do: all %d outputs already under %s", len(done), out)
        return {"inputs": len(done), "skipped": len(done), "written": 0, "failed": 0}
    _connect()
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours below has the total
    ds = ray.data.from_items(items)  # a read operator would wait for a CPU the actor pool holds
    gpus = int(ray.cluster_resources().get("GPU", 0))
    slots = gpus or int(ray.cluster_resources().get("CPU", 1))
    size = concurrency or max(1, min(slots, -(-n // batch_size)))
    res = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    preds = ds.map_batches(
        PredictActor,
        fn_constructor_kwargs={
            "checkpoint": loaded.source,
            "out": out,
            "data": data_root,
            "sleep_s": sleep_s,
        },
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=size),
        batch_format="numpy",
        **res,
    )
    written = failed = 0
    from tqdm import tqdm

    with tqdm(total=n, desc="predict", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for b in preds.iter_batches(batch_size=None, batch_format="numpy"):
            w = int(b["written"].sum())
            written, failed = written + w, failed + len(b["written"]) - w
            bar.update(len(b["written"]))
    log.info(
        "wrote %d, skipped %d already done, %d failed (%d actors, %s)",
        written,
        len(done),
        failed,
        size,
        "GPU" if gpus else "CPU",
    )
    return {"inputs": n + len(done), "skipped": len(done), "written": written, "failed": failed}
