# GPU image: NVIDIA's PyTorch base (CUDA, NCCL, its own torch build and triton; it also ships Transformer
# Engine and flash-attn, the optional back-ends the kernels dispatcher imports lazily).
FROM nvcr.io/nvidia/pytorch:25.04-py3
WORKDIR /opt/ember
COPY . .
# Everything else at the lock's versions (transformers and Hugging Face's `kernels` included), exactly and
# without resolving, so NVIDIA's torch stays: bench/gpu/requirements.sh drops the lines a CUDA torch owns
# (torch, triton, nvidia-*). flash-attn compiles against that torch, hence no build isolation (a no-op when
# the base image already has it). The last line proves the two `kernels` packages import side by side.
RUN bench/gpu/requirements.sh > /tmp/requirements-gpu.txt \
 && pip install --no-cache-dir --no-deps -r /tmp/requirements-gpu.txt \
 && pip install --no-cache-dir --no-deps --no-build-isolation -e . \
 && pip install --no-cache-dir --no-build-isolation flash-attn \
 && python -c "import kernels, transformers, engine.kernels.attention; from kernels import CUDAProperties; print('transformers', transformers.__version__)"
ENTRYPOINT ["torchrun", "--nproc_per_node=gpu", "launch/train.py"]
