"""Training throughput on one GPU: dtl end to end from shards, timm's train.py on the same images as
an ImageFolder, the model-only bound, and the loader alone.

    python bench/gpu_throughput.py --data data/elpv --models resnet50 tf_efficientnet_lite0 \
        vit_small_patch16_224 --size 224 --batch 128 --workers 12 --json OUT.json

All groups trainable, random init (throughput does not depend on the weights), bf16 autocast,
channels_last, AdamW, the same augmentation (random resized crop, horizontal flip). The training
split's images are re-encoded once as JPEG (quality 95), and its shards are listed `--replicas` times so that an epoch lasts long enough to time; timm gets
the same images, one file per sample. Rates:
  model-only   the training step on one batch already on the GPU (the bound)
  loader       dtl's loader alone: decode + augment + collate + pinned batches, finished on the GPU, no model
  dtl          `dtl/train.py`, the img/s of its last epoch (the first pays for cuDNN autotuning), and
               steady_img_per_s: between its last epoch's first and last step records (no start-up)
  ..._device         the same with data.augment_on=device (workers decode, the GPU crops, resizes, flips)
  ..._device_decode  and data.decode_on=device (workers read bytes and draw crops; nvJPEG decodes)
  timm_loader  timm's loader alone (create_loader, as its train.py: persistent workers, prefetcher on a GPU)
  timm         timm's train.py (bench/third_party), the average rate of its last epoch's last log line, and
               steady_img_per_s: the median one-step rate of that epoch's log lines (the first left out)
Peak GPU memory: model-only from torch, dtl from its epoch record (sys/gpu_peak_mem_gb).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from imagefolder_export import export_imagefolder
from result_header import result_header, write_result

REPO = Path(__file__).resolve().parent.parent
TIMM_TRAIN = REPO / "bench" / "third_party" / "timm_train.py"
sys.path.insert(0, str(REPO))


def as_jpeg_shards(root: Path, out: Path) -> None:
    """root's training shards with every image re-encoded as JPEG (quality 95): the format most
    users' images come in, and one that timm's ImageFolder reader takes (it skips .webp)."""
    import io
    import tarfile

    from PIL import Image

    from dtl.shard_stream import iter_tar_samples
    from pack_for_device import add

    index = json.loads((root / "dataset.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    for shard in index["splits"]["train"]["shards"]:
        if (out / shard["name"]).exists():
            continue
        with tarfile.open(out / f"{shard['name']}.tmp", "w") as tar:
            for s in iter_tar_samples(str(root / shard["name"])):
                ext = next(k for k in s if k in ("png", "jpg", "jpeg", "webp"))
                buf = io.BytesIO()
                Image.open(io.BytesIO(s[ext])).save(buf, format="JPEG", quality=95)
                add(tar, f"{s['__key__']}.jpg", buf.getvalue())
                add(tar, f"{s['__key__']}.cls", s["cls"])
        (out / f"{shard['name']}.tmp").rename(out / shard["name"])
    (out / "dataset.json").write_text(json.dumps(index))


def replicate(root: Path, out: Path, times: int) -> int:
    """out/dataset.json listing root's training shards `times` over (symlinks); returns samples."""
    index = json.loads((root / "dataset.json").read_text())
    train = index["splits"]["train"]
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for r in range(times):
        for s in train["shards"]:
            name = f"r{r}-{s['name']}"
            if not (out / name).exists():
                (out / name).symlink_to((root / s["name"]).resolve())
            shards.append({"name": name, "count": s["count"]})
    count = train["count"] * times
    (out / "dataset.json").write_text(json.dumps({**index, "splits": {"train": {
        "shards": shards, "count": count, "class_counts": [c * times for c in train["class_counts"]]}}}))
    return count


def model_only(name: str, size: int, batch: int, steps: int, device: str) -> dict:
    """The training step on a batch that is already on the device: what no loader can beat."""
    from dtl.backbones import create_classifier

    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # as both tools train
    model = create_classifier(name, 4).to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (batch,), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t
    mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"img_per_s": steps * batch / sec, "step_ms": 1e3 * sec / steps, "gpu_peak_mem_gb": mem}


def loader_only(cfg_path: Path, min_images: int) -> dict:
    """dtl's training loader alone (the run's transform, workers, pinned memory), copied to the GPU
    and finished there as training does (normalised; with augment_on=device decoded, cropped, flipped)."""
    from dtl.backbones import create_classifier, preprocessing
    from dtl.data_pipeline import build_data, run_classes
    from dtl.device_batches import as_input
    from dtl.run_config import load_config
    from dtl.shard_stream import start_worker_server

    cfg = load_config(cfg_path)
    start_worker_server(cfg.data.worker_start, cfg.data.num_workers)
    classes = run_classes(cfg.data)
    pre = preprocessing(create_classifier(cfg.model.backbone, len(classes)), cfg.data.img_size, cfg.data.crop_pct)
    data = build_data(cfg, pre, classes, 0, 1, None)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rates = []
    for epoch in range(2):  # the first pass pays for starting the workers
        data.train.set_epoch(epoch, skip_batches=0, batch_size=data.batch_size)
        n, t = 0, time.perf_counter()
        for batch in data.loader(data.train):
            as_input(batch["image"], dev, True, data.normalize)
            n += len(batch["label"])
        if dev.type == "cuda":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t))
        assert n >= min_images, (n, min_images)
    return {"img_per_s": rates[-1], "first_pass_img_per_s": rates[0]}


def timm_loader_only(name: str, folder: Path, args) -> dict:
    """timm's own training loader on the ImageFolder copy, as its train.py builds it (the model's
    data config: interpolation, mean, std; persistent workers; on a GPU its prefetcher normalises)."""
    import timm
    import timm.data

    cuda = torch.cuda.is_available()
    dc = timm.data.resolve_data_config({"input_size": (3, args.size, args.size)},
                                       model=timm.create_model(name, pretrained=False, num_classes=4))
    ds = timm.data.create_dataset("", root=str(folder), split="train", is_training=True, batch_size=args.batch)
    loader = timm.data.create_loader(ds, input_size=dc["input_size"], batch_size=args.batch, is_training=True,
                                     use_prefetcher=cuda, hflip=0.5, color_jitter=0, num_workers=args.workers,
                                     interpolation=dc["interpolation"], mean=dc["mean"], std=dc["std"],
                                     crop_pct=dc["crop_pct"], pin_memory=True,
                                     device=torch.device("cuda" if cuda else "cpu"))
    rates = []
    for _ in range(2):
        n, t = 0, time.perf_counter()
        for x, y in loader:
            x.to("cuda" if cuda else "cpu", non_blocking=True)
            n += len(y)
        if cuda:
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t))
    return {"img_per_s": rates[-1], "first_pass_img_per_s": rates[0]}


VARIANTS = {"workers": ("workers", "workers"), "device": ("device", "workers"), "device_decode": ("device", "device")}


def dtl_config(args, name: str, data: Path, out: Path, variant: str = "workers") -> Path:
    tag = name if variant == "workers" else f"{name}-{variant}"
    augment_on, decode_on = VARIANTS[variant]
    cfg = {"output_dir": str(out / f"dtl-{tag}"), "epochs": args.epochs, "seed": 0,
           "mixed_precision": "bf16" if torch.cuda.is_available() else "no", "report": False, "resume": "never",
           "log_every_steps": 50,
           "data": {"root": str(data), "img_size": args.size, "batch_size": args.batch, "num_workers": args.workers,
                    "normalize_on_device": not args.float_batches, "augment_on": augment_on, "decode_on": decode_on,
                    "val_split": None, "test_split": None, "augment": {"hflip": 0.5, "crop_scale": [0.08, 1.0]}},
           "model": {"backbone": name, "pretrained": False, "channels_last": True},
           "finetune": {"stages": [{"epoch": 0, "train": "all"}], "decay": 1.0},
           "optim": {"lr": 1e-4, "warmup_epochs": 0}, "wandb": {"enabled": False}}
    path = out / f"dtl-{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_dtl(cfg_path: Path, log: Path) -> dict:
    shutil.rmtree(yaml.safe_load(cfg_path.read_text())["output_dir"], ignore_errors=True)  # the bench's own run
    t = time.time()
    r = subprocess.run([sys.executable, "dtl/train.py", "--config", str(cfg_path)], cwd=REPO, stdout=open(log, "w"),
                       stderr=subprocess.STDOUT)
    wall = time.time() - t
    if r.returncode:
        return {"rc": r.returncode, "log_tail": log.read_text()[-1500:]}
    out = Path(yaml.safe_load(cfg_path.read_text())["output_dir"])
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "train/img_per_s" in r]
    steps = [r for r in records if "train/loss_step" in r and r["epoch"] == epochs[-1]["epoch"] - 1]  # its last epoch's
    batch = yaml.safe_load(cfg_path.read_text())["data"]["batch_size"]
    steady = (batch * (steps[-1]["step"] - steps[0]["step"]) / (steps[-1]["time"] - steps[0]["time"])
              if len(steps) > 1 else None)
    return {"rc": 0, "wall_s": wall, "img_per_s": epochs[-1]["train/img_per_s"], "steady_img_per_s": steady,
            "img_per_s_per_epoch": [e["train/img_per_s"] for e in epochs],
            "first_batch_s_per_epoch": [e.get("train/first_batch_s") for e in epochs],
            "gpu_peak_mem_gb": epochs[-1].get("sys/gpu_peak_mem_gb"),
            "host_peak_rss_gb": epochs[-1].get("sys/host_peak_rss_gb")}


def run_timm(args, name: str, folder: Path, out: Path, log: Path) -> dict:
    shutil.rmtree(out / f"timm-{name}", ignore_errors=True)
    cmd = [sys.executable, str(TIMM_TRAIN), "--data-dir", str(folder), "--train-split", "train", "--val-split", "train",
           "--model", name, "--num-classes", "4", "--img-size", str(args.size), "--batch-size", str(args.batch),
           "--epochs", str(args.epochs), "--opt", "adamw", "--lr", "1e-4", "--sched", "cosine", "--warmup-epochs", "0",
           "--hflip", "0.5", "--color-jitter", "0", "--workers", str(args.workers), "--pin-mem", "--channels-last",
           "--log-interval", "20", "--output", str(out / f"timm-{name}"), "--experiment", "run"]
    if torch.cuda.is_available():  # timm's defaults there: its CUDA prefetcher (normalises on the GPU)
        cmd += ["--amp", "--amp-dtype", "bfloat16", "--device", "cuda"]
    else:
        cmd += ["--device", "cpu", "--no-prefetcher"]
    # validation (on the training folder, timm needs one) is stopped by the timeout below after the last epoch's
    # training lines; only those are read
    t = time.time()
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last_epoch = args.epochs - 1
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Test:") and any(x.startswith(f"Train: {last_epoch} ") for x in lines):
            proc.kill()  # the last epoch's training is done; its validation is not part of the rate
            break
    proc.wait()
    wall = time.time() - t
    log.write_text("".join(lines))
    rates, instant = {}, []
    for line in lines:
        if m := re.match(r"Train: (\d+) \[.*\(\s*[\d.]+s,\s*([\d.]+)/s\)", line):
            rates[int(m.group(1))] = float(m.group(2))  # the epoch's last line carries its average
            if int(m.group(1)) == last_epoch and (r := re.search(r"s,\s*([\d.]+)/s\s+\(", line)):
                instant.append(float(r.group(1)))  # one step's rate at each log line (timm syncs there)
    if last_epoch not in rates:
        return {"rc": proc.returncode, "log_tail": "".join(lines)[-1500:]}
    steady = sorted(instant[1:])[len(instant[1:]) // 2] if len(instant) > 2 else None  # median, first line left out
    return {"rc": 0, "wall_s_to_last_train_line": wall, "img_per_s": rates[last_epoch], "steady_img_per_s": steady,
            "img_per_s_per_epoch": [rates[e] for e in sorted(rates)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/elpv")
    p.add_argument("--models", nargs="+", default=["resnet50", "tf_efficientnet_lite0", "vit_small_patch16_224"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--steps", type=int, default=30, help="timed model-only steps")
    p.add_argument("--float-batches", action="store_true", help="dtl with data.normalize_on_device=false")
    p.add_argument("--variants", nargs="+", default=["workers"], choices=list(VARIANTS),
                   help="dtl's data paths: workers (PIL in the workers), device (augment_on=device), "
                        "device_decode (and decode_on=device)")
    p.add_argument("--skip", nargs="*", default=[], choices=["model", "loader", "timm_loader", "dtl", "timm"])
    p.add_argument("--out", default="runs/bench-gpu-throughput")
    p.add_argument("--json")
    args = p.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = out / "shards"
    as_jpeg_shards((REPO / args.data).resolve(), out / "jpeg")
    n = replicate(out / "jpeg", data, args.replicas)
    if "timm" not in args.skip or "timm_loader" not in args.skip:
        export_imagefolder(data, out / "imagefolder", ["train"])
    result = result_header(settings={k: v for k, v in vars(args).items() if k != "json"}, train_images_per_epoch=n,
                           data=json.loads((data / "dataset.json").read_text()).get("source"), models={})
    for name in args.models:
        res = result["models"][name] = {}
        suffix = {v: "" if v == "workers" else f"_{v}" for v in args.variants}
        if "model" not in args.skip:
            res["model_only"] = model_only(name, args.size, args.batch, args.steps, device)
            torch.cuda.empty_cache() if device == "cuda" else None
        if "loader" not in args.skip:
            for v in args.variants:
                res[f"loader{suffix[v]}"] = loader_only(dtl_config(args, name, data, out, v), n - args.workers * args.batch)
        if "timm_loader" not in args.skip:
            res["timm_loader"] = timm_loader_only(name, out / "imagefolder", args)
        if "dtl" not in args.skip:
            for v in args.variants:
                cfg = dtl_config(args, name, data, out, v)
                res[f"dtl{suffix[v]}"] = run_dtl(cfg, cfg.with_suffix(".log"))
        if "timm" not in args.skip:
            res["timm"] = run_timm(args, name, out / "imagefolder", out, out / f"timm-{name}.log")
        bound = res.get("model_only", {}).get("img_per_s")
        for tool in [k for k in res if k.split("_")[0] in ("dtl", "timm", "loader") and isinstance(res[k], dict)]:
            if bound and res[tool].get("img_per_s"):
                res[tool]["of_model_only"] = res[tool]["img_per_s"] / bound
        for v in args.variants:
            if res.get(f"dtl{suffix[v]}", {}).get("img_per_s") and res.get("timm", {}).get("img_per_s"):
                res[f"dtl{suffix[v]}_over_timm"] = res[f"dtl{suffix[v]}"]["img_per_s"] / res["timm"]["img_per_s"]
        for tool in [k for k in res if isinstance(res[k], dict) and res[k].get("steady_img_per_s")]:
            if bound:
                res[tool]["steady_of_model_only"] = res[tool]["steady_img_per_s"] / bound
        print(name, json.dumps({k: ({kk: (round(vv, 3) if isinstance(vv, float) else vv) for kk, vv in v.items()
                                     if kk not in ("log_tail",)} if isinstance(v, dict) else round(v, 3))
                                for k, v in res.items()}), flush=True)
        if args.json:  # after every model: a run cut short keeps what it measured
            write_result(args.json, result)


if __name__ == "__main__":
    main()
