"""moegen: offline MoE inference by module-based batching."""

import os

__version__ = "0.1.0"

# torch's cpu allocator puts tensors of 2 MiB and more in transparent huge pages when this is set
# before its first allocation (importing moegen before torch does that; THP_MEM_ALLOC_ENABLE=0 keeps
# 4 KiB pages). A run's large host tensors (activations, logits, KV staging) come and go every step,
# and glibc hands the big ones back to the kernel on free, so each new one faults its pages in again:
# on a 2-core VM the DeepSeek-V2-Lite-like bench job (256 prompts x 64 new tokens) took 1.0-1.5 M
# page faults and 4.9-10.4 s of system time in 4 KiB pages, 0.36 M and 4.3-5.1 s in huge pages.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
