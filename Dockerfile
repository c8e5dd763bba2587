# GPU image: NVIDIA's PyTorch base (CUDA, NCCL, torch, triton) plus Ember with its GPU extra
# (flash-attn, Transformer Engine: optional back-ends the kernels dispatcher imports lazily).
FROM nvcr.io/nvidia/pytorch:25.01-py3
WORKDIR /opt/ember
COPY . .
# The base image's torch satisfies torch>=2.6, so pip keeps it instead of pulling another build.
RUN pip install --no-cache-dir -e ".[gpu]"
ENTRYPOINT ["torchrun", "--nproc_per_node=gpu", "launch/train.py"]
