"""The cloud prices, GPU peaks and efficiency the planner (pipeline.plan) assumes; each is
printed with the plan, so a user can see and override what the estimate rests on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuType:
    name: str
    peak_tflops: float  # dense bf16/fp16 tensor-core peak (no sparsity)
    price_per_hour: float  # default on-demand-like $/GPU-hour
    vcpus_per_gpu: float  # the usual multi-GPU instance's vCPUs / GPUs (what feeds the loader)


# vCPUs per GPU: p5.48xlarge 192/8, p4d.24xlarge 96/8, g6.48xlarge 192/8.
GPU_TYPES: dict[str, GpuType] = {
    "h100": GpuType("NVIDIA H100 SXM", 989.0, 4.0, 24.0),
    "a100": GpuType("NVIDIA A100", 312.0, 2.5, 12.0),
    "l4": GpuType("NVIDIA L4", 121.0, 0.8, 24.0),
}
DEFAULT_UTILIZATION = 0.35  # fraction of peak a real PyTorch job sustains (MFU)
FWD_BWD_FACTOR = 3.0  # training step ~ forward + backward (~2x forward) = 3x forward
FLOPS_PER_MAC = 2

# S3 Standard, us-east-1 list prices; GB = 2^30 bytes as AWS bills it. In-region transfer
# between EC2 and S3 is free, so no transfer cost is counted.
S3_PRICE_PER_GB_MONTH = 0.023
S3_PUT_PRICE_PER_1000 = 0.005  # PUT/COPY/POST/LIST class
S3_GET_PRICE_PER_1000 = 0.0004  # GET/SELECT class
GIB = 2**30
# s3fs pipe_file: one PUT below 2 x 50 MiB, else a multipart upload of 50 MiB parts
# (create + parts + complete, all billed as PUT-class requests).
MULTIPART_THRESHOLD = 100 * 2**20
MULTIPART_PART_SIZE = 50 * 2**20
