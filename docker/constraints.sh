#!/bin/sh
# Prints the pins a Docker build installs with, from constraints.txt (the versions CI ran):
#   cuda  as they are: PyPI's torch wheels, which carry the CUDA 13.0 libraries (3.2 GB);
#   cpu   torch and torchvision as their +cpu builds from PyTorch's CPU index, and the
#         CUDA-only wheels (nvidia-*, cuda-*, triton) left out, since nothing else needs them.
# Derived rather than kept as a second file, so the two never drift apart.
set -eu
case "${1:-}" in
cuda) cat constraints.txt ;;
cpu) grep -v -E '^(nvidia-|cuda-|triton==)' constraints.txt | sed -E 's/^(torch|torchvision)==([^+]+)$/\1==\2+cpu/' ;;
*)
    echo "usage: docker/constraints.sh cpu|cuda" >&2
    exit 2
    ;;
esac
