# sam_ft on a CUDA PyTorch base image: docker build -t sam_ft . && docker run --gpus all sam_ft
# (the demo). Other commands: docker run --gpus all --entrypoint sam-ft-predict sam_ft ...
# CPU only (no CUDA libraries, a much smaller image):
#   docker build --build-arg BASE=python:3.11-slim \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t sam_ft:cpu .
ARG BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE}
# Empty: keep the base image's torch. A wheel index (the CPU one above): torch and torchvision
# from there first, so installing sam_ft finds them and pulls no CUDA build.
ARG TORCH_INDEX=

ENV SAM_FT_CACHE=/cache \
    PYTHONUNBUFFERED=1
RUN if [ -n "$TORCH_INDEX" ]; then \
        pip install --no-cache-dir torch torchvision --index-url "$TORCH_INDEX"; \
    fi
# A regular install, as outside a checkout: the configs ship inside the package (sam_ft/conf).
COPY pyproject.toml README.md /src/
COPY sam_ft /src/sam_ft
COPY conf /src/conf
RUN pip install --no-cache-dir /src && rm -rf /src
WORKDIR /app
VOLUME ["/cache", "/app/logs"]
ENTRYPOINT ["sam-ft-train"]
