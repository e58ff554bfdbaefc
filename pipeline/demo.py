"""``catkd demo``: teacher -> vanilla student and CAT-KD student, on the embedded
synthetic dataset, in one process on the CPU; prints a table and writes a CAM picture.

The Ray pipeline (shards, cached teacher targets, Ray Train) replaces the in-memory
steps here as it lands; the table and the outputs folder keep their shape.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from catkd.losses import CATKDConfig
from catkd.models import build_model, checkpoint_payload
from pipeline.local_train import LocalTrainConfig, evaluate, normalize, train_local
from pipeline.synthetic import CLASSES, make_arrays
from pipeline.viz import peak_in_box_rate, save_cam_grid, true_class_cams


@dataclass
class DemoConfig:
    out: str = "outputs/demo"
    train_samples: int = 2000
    test_samples: int = 500
    image_size: int = 32
    teacher: str = "resnet20"
    student: str = "resnet8"
    teacher_epochs: int = 8
    student_epochs: int = 6
    beta: float = 0.5
    seed: int = 0


def run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    num_classes = len(CLASSES)
    print(f"[demo] making synthetic:shapes ({cfg.train_samples} train, {cfg.test_samples} test, {cfg.image_size}px)")
    train = [torch.from_numpy(a) for a in make_arrays(cfg.seed, 0, cfg.train_samples, cfg.image_size)]
    test = [torch.from_numpy(a) for a in make_arrays(cfg.seed + 1, 0, cfg.test_samples, cfg.image_size)]

    runs = {
        "teacher": (cfg.teacher, LocalTrainConfig(mode="ce", epochs=cfg.teacher_epochs, seed=cfg.seed), True),
        "vanilla student": (cfg.student, LocalTrainConfig(mode="ce", epochs=cfg.student_epochs, seed=cfg.seed), False),
        "CAT-KD student": (
            cfg.student,
            LocalTrainConfig(mode="catkd", epochs=cfg.student_epochs, seed=cfg.seed, catkd=CATKDConfig(beta=cfg.beta)),
            False,
        ),
    }
    models, results = {}, {}
    teacher = None
    for label, (arch, train_cfg, is_teacher) in runs.items():
        print(f"[demo] training {label} ({arch}, mode {train_cfg.mode}, {train_cfg.epochs} epochs)")
        model = build_model(arch, num_classes, bias=is_teacher)
        start = time.perf_counter()
        history = train_local(model, train[0], train[1], train_cfg, teacher=teacher)
        if is_teacher:
            teacher = model
        models[label] = model
        torch.save(checkpoint_payload(model, arch), out / f"{label.replace(' ', '_')}.pth")
        results[label] = {
            "arch": arch,
            "top1": evaluate(model, test[0], test[1]),
            "train_images_per_s": sum(h["images_per_s"] for h in history) / len(history),
            "train_seconds": time.perf_counter() - start,
            "history": history,
        }

    inputs = normalize(test[0])
    cams = {label: true_class_cams(m, inputs, test[1]) for label, m in models.items()}
    for label in models:
        results[label]["cam_peak_in_box"] = peak_in_box_rate(cams[label], test[2])
    shown = slice(0, 6)
    save_cam_grid(out / "cams.png", test[0][shown].numpy(), {k: v[shown] for k, v in cams.items()}, list(CLASSES), test[1][shown].numpy())
    (out / "results.json").write_text(json.dumps({"config": asdict(cfg), "results": results}, indent=2))
    print_table(results)
    print(f"[demo] outputs in {out.resolve()} (results.json, cams.png, checkpoints)")
    return results


def print_table(results: dict) -> None:
    print(f"\n{'model':<18}{'arch':<11}{'top-1 %':>9}{'train img/s':>13}{'CAM peak in box':>17}")
    for label, r in results.items():
        print(f"{label:<18}{r['arch']:<11}{r['top1']:>9.1f}{r['train_images_per_s']:>13.0f}{100 * r['cam_peak_in_box']:>16.1f}%")
