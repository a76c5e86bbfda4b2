# sam_ft on a CUDA PyTorch base image: docker build -t sam_ft . && docker run --gpus all sam_ft
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /app
ENV SAM_FT_CACHE=/cache \
    PYTHONUNBUFFERED=1
COPY pyproject.toml README.md ./
COPY sam_ft ./sam_ft
COPY conf ./conf
COPY train.py evaluate.py ./
RUN pip install --no-cache-dir .
VOLUME ["/cache", "/app/logs"]
ENTRYPOINT ["python", "train.py"]
