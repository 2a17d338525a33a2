"""Where the label disagreement with MONAI comes from: one run of each engine variant.

``python -m benchmarks.agreement [WEIGHTS] [OVERLAP]`` segments the item-1 input once
with MONAI's constant-mode fp32 ``sliding_window_inference`` (the Dice reference) and
once per variant of our engine, printing each variant's label Dice against it and
against the phantom's truth: the shipped default (the whole volume's window grid,
Gaussian weighting), constant weighting in bf16 and in fp32, fp32 without the crop,
``window_grid="body"`` (:func:`LiverTumorSegLib.boxes.window_box`: the grid on the
body's box along axes where that saves windows) in the default and in constant
weighting, and the earlier crops for comparison: the grid laid on the body's box
(grown onto the pooling lattice, :func:`LiverTumorSegLib.boxes.align_box`) on every
axis, and that without the alignment.
One repetition each: this explains the agreement figures of ``bench_inference``; it
times nothing.
"""

from __future__ import annotations

import sys
import time


def main(argv=None) -> None:
    import numpy as np
    import torch

    from LiverTumorSegLib import boxes, pipeline
    from LiverTumorSegLib.model import load_model
    from LiverTumorSegLib.pipeline import Segmenter, SegmentOptions
    from LiverTumorSegLib.preprocess import scale_intensity

    from . import inputs, weights
    from .bench_inference import _full_logits, competitors, label_dice

    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(2)
    model = load_model(argv[0] if argv else weights.ensure_weights())
    overlap = float(argv[1]) if len(argv) > 1 else weights.SEED_OVERLAP
    hu, truth = inputs.model_grid_phantom((256, 256, 200))
    x = scale_intensity(hu, model.card.intensity)
    t = time.perf_counter()
    ref_logits = competitors(model, hu, x, overlap, batch=2)["monai_constant"]()
    ref = ref_logits.argmax(0).astype(np.uint8)
    top = torch.softmax(torch.from_numpy(ref_logits), 0).amax(0).numpy()
    del ref_logits
    in_body = hu > -500.0
    unsure = np.count_nonzero((top < 0.9) & in_body) / max(np.count_nonzero(in_body), 1)
    print(f"MONAI constant fp32: {time.perf_counter() - t:.0f} s; vs truth {label_dice(ref, truth)}; "
          f"body voxels (HU > -500) with a top class probability below 0.9: {unsure:.4f}", flush=True)
    shipped = pipeline.window_box
    crops = {
        "shipped": shipped,
        "grid on the body's box": lambda box, shape, patch, overlap, d, **kw: boxes.align_box(box, shape, patch, d),
        "grid on the body's box, unaligned": lambda box, *args, **kw: box,
    }
    bf16, fp32 = dict(weighting="constant"), dict(weighting="constant", precision="fp32")
    body = dict(window_grid="body")
    variants = [("default", {}, "shipped"), ("constant bf16", bf16, "shipped"), ("constant fp32", fp32, "shipped"),
                ("constant fp32, no crop", dict(fp32, crop_to_body=False), "shipped"),
                ("default, --window-grid body", body, "shipped"),
                ("constant bf16, --window-grid body", dict(bf16, **body), "shipped"),
                ("default", {}, "grid on the body's box"),
                ("constant fp32", fp32, "grid on the body's box"),
                ("constant fp32", fp32, "grid on the body's box, unaligned")]
    try:
        for name, options, crop in variants:
            pipeline.window_box = crops[crop]
            seg = Segmenter(model, SegmentOptions(device="cpu", overlap=overlap, batch_size=2, **options))
            logits, box = seg.infer_logits(hu)
            labels = _full_logits(logits, box, hu.shape).argmax(0)
            print(f"{name} ({crop} crop): box {[(s.start, s.stop) for s in box]}, "
                  f"vs MONAI constant {label_dice(labels, ref)}, vs truth {label_dice(labels, truth)}", flush=True)
    finally:
        pipeline.window_box = shipped


if __name__ == "__main__":
    main()
