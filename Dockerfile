# sam_ft on a CUDA PyTorch base image: docker build -t sam_ft . && docker run --gpus all sam_ft
# (the demo). Other commands: docker run --gpus all --entrypoint sam-ft-predict sam_ft ...
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV SAM_FT_CACHE=/cache \
    PYTHONUNBUFFERED=1
# A regular install, as outside a checkout: the configs ship inside the package (sam_ft/conf).
COPY pyproject.toml README.md /src/
COPY sam_ft /src/sam_ft
COPY conf /src/conf
RUN pip install --no-cache-dir /src && rm -rf /src
WORKDIR /app
VOLUME ["/cache", "/app/logs"]
ENTRYPOINT ["sam-ft-train"]
