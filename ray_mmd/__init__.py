"""ray-mmd: elastic, preemption-tolerant Ray trainer for a mask + monocular depth UNet."""

__version__ = "0.1.0"
