"""Small stand-ins for what ImageNet teams download, made here (nothing is downloaded):
the README's ImageNet recipe runs on them as written.

    .venv/bin/python bench/hub_like.py webdataset data/imagenet-wds     # timm's imagenet-1k-wds layout
    .venv/bin/python bench/hub_like.py parquet data/imagenet-parquet    # Hugging Face's data/ layout
    .venv/bin/python bench/hub_like.py teacher hf-cache acme/resnet10t-small --classes 10

``webdataset`` writes ``imagenet1k-{train,validation}-NNNN.tar`` (each sample
``.jpg``, ``.cls``, ``.json``) and ``_info.json``; ``parquet`` writes
``{train,validation}-NNNNN-of-NNNNN.parquet`` with the hub's schema and class names;
``teacher`` puts a timm model's repo (``config.json`` and ``model.safetensors``, random
weights) in a Hugging Face cache folder, as ``hf download`` would, so that
``timm:hf-hub:REPO:pretrained=true`` resolves offline with ``HF_HUB_CACHE`` set to it.
The generators are the tests' own (tests/helpers/hub_datasets.py).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.helpers.hub_datasets import put_in_hf_cache, timm_repo_files, write_hf_parquet, write_wds  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    kinds = parser.add_subparsers(dest="kind", required=True)
    for kind in ("webdataset", "parquet"):
        sub = kinds.add_parser(kind)
        sub.add_argument("out")
        sub.add_argument("--train", type=int, default=200, help="training samples")
        sub.add_argument("--validation", type=int, default=50, help="validation samples")
        sub.add_argument("--classes", type=int, default=10)
    teacher = kinds.add_parser("teacher")
    teacher.add_argument("cache", help="the Hugging Face cache folder (HF_HUB_CACHE)")
    teacher.add_argument("repo", help="ORG/NAME")
    teacher.add_argument("--architecture", default="resnet10t")
    teacher.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    if args.kind == "teacher":
        snapshot = put_in_hf_cache(args.cache, args.repo, timm_repo_files(args.architecture, args.classes))
        print(f"{args.repo}: {snapshot}")
        return
    splits = {"train": args.train, "validation": args.validation}
    if args.kind == "webdataset":
        write_wds(args.out, splits, num_classes=args.classes, per_shard=50)
    else:
        write_hf_parquet(args.out, splits, num_classes=args.classes, files_per_split=2, row_group_size=32)
    print(f"{args.kind}: {args.out} ({args.train} training and {args.validation} validation samples)")


if __name__ == "__main__":
    main()
