# Sourced by the GPU scripts: puts the machine's CUDA libraries (runtime, cuBLAS, cuRAND, NVRTC),
# the driver's and PyTorch's wheel libraries on LD_LIBRARY_PATH, which target-gpu/ragar needs.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
  /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu \
  /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib; do
  [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH
