# GPU image: NVIDIA's PyTorch base (CUDA, NCCL, torch 2.7 pre-release, triton; it also ships
# Transformer Engine and flash-attn, the optional back-ends the kernels dispatcher imports lazily).
FROM nvcr.io/nvidia/pytorch:25.04-py3
WORKDIR /opt/ember
COPY . .
# torch 2.7.0a0 satisfies torch>=2.6, so pip keeps NVIDIA's build. flash-attn compiles against
# that torch, hence no build isolation (a no-op when the base image already has it).
RUN pip install --no-cache-dir -e . \
 && pip install --no-cache-dir --no-build-isolation flash-attn
ENTRYPOINT ["torchrun", "--nproc_per_node=gpu", "launch/train.py"]
