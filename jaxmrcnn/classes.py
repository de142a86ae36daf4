"""COCO class lists as the frameworks index them."""

from __future__ import annotations

# torchvision's 91-entry list: index == COCO category id; unused ids are "N/A".
TORCHVISION_COCO_CATEGORIES = [
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train",
    "truck", "boat", "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter",
    "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A",
    "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip


def torchvision_coco_classes() -> tuple[list[str], list[int]]:
    """(names, category ids) per class index of a torchvision COCO model (91 classes).

    The index is the COCO category id, also for the "N/A" slots (ids COCO never used), so
    labels are exactly torchvision's; only the background gets -1."""
    names = list(TORCHVISION_COCO_CATEGORIES)
    ids = [-1 if n == "__background__" else i for i, n in enumerate(names)]
    return names, ids


def generic_classes(num_classes: int, background_index: int) -> tuple[list[str], list[int]]:
    """Placeholder names "class_<i>" and ids == index for a model with unknown classes."""
    names = [
        "__background__" if i == background_index else f"class_{i}" for i in range(num_classes)
    ]
    ids = [-1 if i == background_index else i for i in range(num_classes)]
    return names, ids


def coco80_classes(background_index: int) -> tuple[list[str], list[int]]:
    """(names, category ids) of an 81-class COCO model whose 80 foreground classes are
    contiguous in COCO id order (Detectron2, mmdet, maskrcnn-benchmark, Detectron), with the
    background at `background_index` (0 or 80)."""
    fg = [(n, i) for i, n in enumerate(TORCHVISION_COCO_CATEGORIES) if i > 0 and n != "N/A"]
    assert len(fg) == 80
    names = [n for n, _ in fg]
    ids = [i for _, i in fg]
    names.insert(background_index, "__background__")
    ids.insert(background_index, -1)
    return names, ids
