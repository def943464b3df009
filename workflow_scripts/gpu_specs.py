"""Dense bf16 peak FLOP/s of one GPU, per variant (issue 18, item 5): the MFU denominators of the GPU check
(workflow_scripts/gpu_check.py) and of the planner's GPU label (planner.gpu_type).

Values are NVIDIA's datasheet "BF16 Tensor Core" figures without sparsity (the datasheets print the sparse figure,
twice these): H100 SXM 1,979 / PCIe 1,513 / NVL 1,671 TFLOPS sparse (NVIDIA H100 Tensor Core GPU datasheet);
H200 SXM 1,979 / NVL 1,671 (H200 datasheet); A100 SXM and PCIe 312 dense (A100 datasheet); L40S 733 sparse (L40S
datasheet); L4 242 sparse (L4 datasheet); A10 125 dense (A10 datasheet); B200 4.5 PFLOPS sparse per GPU (HGX B200:
36 PFLOPS FP16/BF16 sparse for 8 GPUs). The variant matters: an H100 PCIe reports 76% of an SXM's peak, so one
H100 figure for every variant misstates MFU by up to 31%.
"""

from __future__ import annotations

import re

# (pattern on the device name, e.g. torch.cuda.get_device_name() "NVIDIA H100 80GB HBM3", label, dense bf16 FLOP/s);
# the first match wins, so the specific variants (NVL, PCIe) come before the plain name (SXM).
PEAK_BF16 = [
    (r"H100.*NVL", "H100 NVL", 835.5e12),
    (r"H100.*PCIe", "H100 PCIe", 756.5e12),
    (r"H100|GH200", "H100 SXM", 989.4e12),
    (r"H200.*NVL", "H200 NVL", 835.5e12),
    (r"H200", "H200 SXM", 989.4e12),
    (r"A100", "A100", 312e12),
    (r"L40S", "L40S", 362.05e12),
    (r"\bL4\b", "L4", 121e12),
    (r"\bA10\b", "A10", 125e12),
    (r"B200", "B200", 2.25e15),
]


def peak_bf16(name: str) -> tuple[str, float] | None:
    """(variant, dense bf16 FLOP/s) of a GPU named `name` (a device name or a planner label), or None if unknown."""
    for pattern, label, flops in PEAK_BF16:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return label, flops
    return None
