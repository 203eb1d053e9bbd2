"""Command line: `python -m maskdit_fast.eval {generate,metrics,stats,mnist,mnist-ref,mnist-classifier} ...`.

    generate --ckpt C --out DIR         the sample batch (DIR/samples.npz), resumable, under torchrun too
    metrics SAMPLES.npz REFERENCE.npz   FID, sFID, IS, precision/recall (Inception-v3, ADM protocol)
    stats REF.npz OUT.npz               reference statistics of an ADM image batch, for `metrics`
    mnist SAMPLES.npz [--labels ...]    MNIST classifier accuracy and Fréchet distance
    mnist-ref OUT.npz                   the 1000 held-out MNIST digits as an ADM reference batch
    mnist-classifier OUT.safetensors    train the MNIST classifier here (how the shipped weights were made)

Each subcommand is a parser in `build_parser` plus a `_run_<name>` handler; add new ones the same way.
"""

import argparse

import numpy as np
import torch

from maskdit_fast.errors import ArgumentParser
from maskdit_fast.eval import generate_samples
from maskdit_fast.eval.images import load_npz_images, to_uint8_nhwc
from maskdit_fast.eval.metrics import (
    INCEPTION_WEIGHTS_ENV,
    InceptionV3,
    evaluate_npz,
    write_reference_stats,
)
from maskdit_fast.eval.mnist_classifier import (
    get_mnist_classifier,
    mnist_metrics,
    mnist_split,
    save_mnist_classifier,
    train_mnist_classifier,
)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m maskdit_fast.eval",
        description="Evaluate generated samples: Inception metrics (ADM protocol) and MNIST metrics.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser(
        "generate",
        help="sample a checkpoint into DIR/samples.npz (ADM layout): seeded, resumable, multi-GPU under torchrun",
    )
    generate_samples.add_arguments(generate)
    generate.set_defaults(handler=_run_generate)

    def add_inception_options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--inception-weights",
            metavar="PATH",
            help=f"local torch-fidelity Inception weights (.pth); default ${INCEPTION_WEIGHTS_ENV} or download",
        )
        command.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        command.add_argument("--batch-size", type=int, default=250)

    metrics = commands.add_parser("metrics", help="FID, sFID, Inception Score, precision/recall")
    metrics.add_argument("samples", help="ADM sample batch: .npz with arr_0 uint8 (N, H, W, C)")
    metrics.add_argument("reference", help="ADM reference batch (arr_0 and/or mu, sigma) or a `stats` output")
    add_inception_options(metrics)
    metrics.set_defaults(handler=_run_metrics)

    stats = commands.add_parser("stats", help="reference statistics (+ pool features) of an image batch")
    stats.add_argument("images", help=".npz with arr_0 uint8 (N, H, W, C)")
    stats.add_argument("out", help="output .npz")
    add_inception_options(stats)
    stats.set_defaults(handler=_run_stats)

    mnist = commands.add_parser("mnist", help="MNIST classifier accuracy and Fréchet distance")
    mnist.add_argument("samples", help=".npz with arr_0 uint8 (N, 32, 32, 1); labels under 'labels' or 'arr_1'")
    mnist.add_argument(
        "--labels", type=int, nargs="+", help="requested classes: one per sample, or one for all (overrides the npz)"
    )
    mnist.add_argument("--cache-dir", help="use a classifier trained on this machine, cached in this folder "
                                            "(default: the weights shipped with the package)")
    mnist.set_defaults(handler=_run_mnist)

    mnist_ref = commands.add_parser("mnist-ref", help="write the 1000 held-out digits as an ADM reference batch")
    mnist_ref.add_argument("out", help="output .npz (arr_0 uint8 (1000, 32, 32, 1), labels)")
    mnist_ref.set_defaults(handler=_run_mnist_ref)

    classifier = commands.add_parser("mnist-classifier", help="train the MNIST classifier and write its weights")
    classifier.add_argument("out", help="output .safetensors")
    classifier.set_defaults(handler=_run_mnist_classifier)
    return parser


def _print_results(results: dict[str, float | int | None]) -> None:
    for key, value in results.items():
        print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")


def _run_generate(args: argparse.Namespace) -> None:
    generate_samples.generate_samples(generate_samples.request_from_args(args))


def _run_metrics(args: argparse.Namespace) -> None:
    extractor = InceptionV3(args.inception_weights, args.device)
    _print_results(evaluate_npz(args.samples, args.reference, extractor, args.batch_size))


def _run_stats(args: argparse.Namespace) -> None:
    extractor = InceptionV3(args.inception_weights, args.device)
    stats = write_reference_stats(args.images, args.out, extractor, args.batch_size)
    print(f"wrote {args.out}: {len(stats.pool)} images, {stats.mu.shape[0]}-d pool features ({stats.extractor})")


def _run_mnist(args: argparse.Namespace) -> None:
    images = load_npz_images(args.samples)
    labels = args.labels
    if labels is None:
        with np.load(args.samples) as data:
            key = next((key for key in ("labels", "arr_1") if key in data), None)
            labels = data[key] if key else None
    elif len(labels) == 1:
        labels = labels * len(images)
    classifier = get_mnist_classifier(args.cache_dir)
    _print_results(mnist_metrics(images, labels, classifier))


def _run_mnist_classifier(args: argparse.Namespace) -> None:
    model = train_mnist_classifier()
    save_mnist_classifier(model, args.out)
    images, labels = mnist_split("heldout")
    print(f"wrote {args.out}: held-out accuracy {mnist_metrics(images, labels, model)['accuracy']:.2%}")


def _run_mnist_ref(args: argparse.Namespace) -> None:
    images, labels = mnist_split("heldout")
    np.savez(args.out, arr_0=to_uint8_nhwc(images), labels=labels.numpy().astype(np.uint8))
    print(f"wrote {args.out}: {len(images)} held-out digits")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    with parser.user_errors():  # bad input (missing or damaged file, bad request): one message, exit 2
        args.handler(args)


if __name__ == "__main__":
    main()
