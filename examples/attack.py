"""Make a class disappear: a few steps of PGD (L-infinity) on the input pixels against the
"target class missed" criterion (jaxmrcnn/robustness.py), before/after PNGs written.

    python examples/attack.py --class star --out attack_out/     # the shipped shapes model

Each step: g = d(sum of the class's detection scores)/d(pixels); x <- x - step * sign(g),
projected onto the eps-ball around the original and onto [0, 255]. The image is a generated
shapes scene (jaxmrcnn/data/synth.py, `--seed`) holding the class, or `--image FILE`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def scene_with(class_name: str, size_hw: tuple[int, int], seed: int) -> np.ndarray:
    """A generated shapes image (synth.render) holding at least one `class_name` shape."""
    from jaxmrcnn.data import synth

    names = [c["name"] for c in synth.CATEGORIES]
    rng = np.random.default_rng(seed)
    for _ in range(200):
        rgb, inst = synth.render(rng, size_hw, max_shapes=4)
        if class_name not in names or any(names[k] == class_name for k, _ in inst):
            return rgb
    return rgb


class _Drawn:
    """A prediction dict as jaxmrcnn.demo.draw reads detections (no masks)."""

    def __init__(self, pred: dict):
        self.boxes, self.scores, self.names = pred["boxes"], pred["scores"], pred["names"]
        self.masks = np.zeros((len(self.scores), 0), bool)

    def __len__(self) -> int:
        return len(self.scores)


def _draw(image: np.ndarray, pred: dict):
    from jaxmrcnn.demo import draw

    return draw(image, _Drawn(pred), score_thresh=0.0)


def attack(rd, image: np.ndarray, target: int, *, steps: int, eps: float, step_size: float):
    """PGD on `image` (uint8 [H, W, 3]) -> (adversarial float image, criterion per step)."""
    from jaxmrcnn.robustness import TargetClassMissed

    crit = TargetClassMissed(target, scope="candidates")
    x0 = image.astype(np.float32)
    x = x0.copy()
    history = []
    for _ in range(steps):
        values, grad = rd.values_and_gradient(x[None], crit)
        history.append(float(values[0]))
        x = x - step_size * np.sign(grad[0])
        x = np.clip(np.clip(x, x0 - eps, x0 + eps), 0.0, 255.0)
    history.append(float(rd.criterion_values(x[None], crit)[0]))
    return x, history


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", help="checkpoint (default: the shipped shapes model, "
                                      "jaxmrcnn.weights.default_checkpoint_path())")
    ap.add_argument("--class", dest="target", required=True, help="class name to remove")
    ap.add_argument("--image", help="RGB image file (default: a generated shapes scene)")
    ap.add_argument("--size", type=int, nargs="+", default=[256],
                    help="generated scene size: SIDE or H W (px)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--eps", type=float, default=8.0, help="L-inf radius, 0-255 pixel units")
    ap.add_argument("--step-size", type=float, default=2.0)
    ap.add_argument("--threshold", type=float, default=0.5, help="detection score threshold")
    ap.add_argument("--out", default="attack_out", help="folder for before.png / after.png")
    args = ap.parse_args(argv)

    if args.weights:
        weights = Path(args.weights)
    else:  # the shipped shapes model
        try:
            from jaxmrcnn.weights import default_checkpoint_path

            weights = Path(default_checkpoint_path())
        except (ImportError, FileNotFoundError) as e:
            print(f"error: no default model ({e}); pass --weights FILE", file=sys.stderr)
            return 2
    if not weights.is_file():
        print(f"error: no checkpoint at {weights}: pass --weights FILE (any "
              f"jaxmrcnn.load-able checkpoint)", file=sys.stderr)
        return 2
    import jaxmrcnn
    from jaxmrcnn.robustness import DifferentiableDetector

    rd = DifferentiableDetector(jaxmrcnn.load(weights), bounds=(0, 255), channel_axis=-1,
                                score_threshold=args.threshold)
    try:
        target = rd.class_index(args.target)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.image:
        from jaxmrcnn.images import read_image

        image = read_image(args.image)
    else:
        size = args.size * 2 if len(args.size) == 1 else args.size[:2]
        image = scene_with(args.target, tuple(size), args.seed)

    (before,) = rd.batch_predictions(image[None].astype(np.float32))
    x, history = attack(rd, image, target, steps=args.steps, eps=args.eps,
                        step_size=args.step_size)
    adv = np.round(x).astype(np.uint8)  # what gets saved is what gets evaluated
    (after,) = rd.batch_predictions(adv[None].astype(np.float32))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _draw(image, before).save(out / "before.png")
    _draw(adv, after).save(out / "after.png")
    n_before = int(np.sum(before["classes"] == target))
    n_after = int(np.sum(after["classes"] == target))
    print(f"criterion (sum of {args.target!r} candidate scores): "
          + " -> ".join(f"{v:.3f}" for v in history))
    print(f"{args.target!r} detections above {args.threshold}: {n_before} before, {n_after} "
          f"after (max pixel change {np.abs(adv.astype(int) - image).max()})")
    print(f"wrote {out / 'before.png'} and {out / 'after.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
