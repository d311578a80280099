"""Every family's box format maps to the exact original pixel coordinates.

Frames: a portrait chest radiograph of 1841 columns x 1955 rows (RG1) and a landscape one of
211 x 169 (the DX thorax sample), prepared the way each family prepares its input.
"""

import json

import pytest

from inference.boxes import PARSERS, format_box, parse_boxes
from inference.geometry import geometry_for
from inference.results import Box

PORTRAIT = (1841, 1955)
LANDSCAPE = (211, 169)


def transform(size_wh, mode, size, multiple_of=1):
    return geometry_for(*size_wh, size=size, mode=mode, multiple_of=multiple_of)[0]


def pixels(box, size_wh):
    return box.to_pixels(*size_wh)


# (format, frame size, mode, model size, multiple_of, text, expected (x0, y0, x1, y1) pixels, label)
CASES = [
    # MedGemma: pad to 1955 square, 57 columns left; box_2d is y-first on 0..1000.
    ("medgemma", PORTRAIT, "pad", 896, 1,
     '```json\n[{"box_2d": [100, 200, 500, 600], "label": "right lung"}]\n```',
     (334.0, 195.5, 1116.0, 977.5), "right lung"),
    # Landscape: 21 rows of padding on top.
    ("medgemma", LANDSCAPE, "pad", 896, 1,
     '[{"box_2d": [500, 250, 750, 500], "label": "heart"}]', (52.75, 84.5, 105.5, 137.25), "heart"),
    # Qwen2.5-VL / Lingshu: pixels of the resized input (448 x 364 for landscape, 420 x 448 for
    # portrait); 211/448 and 169/364 original pixels per input pixel.
    ("qwen2_5_vl", LANDSCAPE, "fit", 448, 28, '{"bbox_2d": [112, 91, 224, 182], "label": "nodule"}',
     (52.75, 42.25, 105.5, 84.5), "nodule"),
    ("qwen2_5_vl", PORTRAIT, "fit", 448, 28,
     '```json\n[\n\t{"bbox_2d": [105, 112, 210, 224], "label": "heart"}\n]\n```',
     (460.25, 488.75, 920.5, 977.5), "heart"),
    # Qwen2-VL: special-token markup, 0..1000 of the input (the same box as the first 2.5 case).
    ("qwen2_vl", LANDSCAPE, "fit", 448, 28,
     "<|object_ref_start|>nodule<|object_ref_end|><|box_start|>(250,250),(500,500)<|box_end|><|im_end|>",
     (52.75, 42.25, 105.5, 84.5), "nodule"),
    ("qwen2_vl", PORTRAIT, "fit", 448, 28,
     "The <|object_ref_start|>heart<|object_ref_end|><|box_start|>(250, 250), (500, 500)<|box_end|> is enlarged.",
     (460.25, 488.75, 920.5, 977.5), "heart"),
    # Qwen3-VL: JSON like 2.5, on 0..1000 of the input (sides multiples of 32: 448 x 352).
    ("qwen3_vl", LANDSCAPE, "fit", 448, 32, '[{"bbox_2d": [250, 250, 500, 500], "label": "nodule"}]',
     (52.75, 42.25, 105.5, 84.5), "nodule"),
    ("qwen3_vl", PORTRAIT, "fit", 448, 32, '```json\n[{"bbox_2d": [100, 200, 600, 900], "label": "lung"}]\n```',
     (184.1, 391.0, 1104.6, 1759.5), "lung"),
    # MedRegA / InternVL: 0..1000 of the original, whatever the input geometry.
    ("medrega", PORTRAIT, "resize", 448, 1, "The <ref>left lung</ref><box>[[100, 200, 500, 800]]</box> is clear.",
     (184.1, 391.0, 920.5, 1564.0), "left lung"),
    # MiniGPT-Med: 0..100 of the stretched input.
    ("minigpt", LANDSCAPE, "resize", 448, 1, "<p>effusion</p> {<10><20><50><80>}",
     (21.1, 33.8, 105.5, 135.2), "effusion"),
    # MAIRA-2: 100 bins (read at bin centres) of the centre-cropped square: 57 rows cut on top.
    ("maira2", PORTRAIT, "crop", 518, 1, "<obj>Small left effusion.<box><x55><y45><x70><y56></box></obj>",
     (1021.755, 894.655, 1297.905, 1097.165), "Small left effusion."),
    # Landscape crop: 21 columns cut on the left.
    ("maira2", LANDSCAPE, "crop", 518, 1, "<obj>Heart.<box><x0><y0><x99><y99></box></obj>",
     (21.845, 0.845, 189.155, 168.155), "Heart."),
    # CheXagent: 0..100 of the input (here a padded square).
    ("chexagent", LANDSCAPE, "pad", 512, 1, "<|ref|>opacity<|/ref|><|box|>(10,20),(50,80)<|/box|>",
     (21.1, 21.2, 105.5, 147.8), "opacity"),
    # PaliGemma: 1024 bins, y first, stretched input.
    ("paligemma", LANDSCAPE, "resize", 448, 1, "<loc0256><loc0512><loc0768><loc1024> heart",
     (105.5, 42.25, 211.0, 126.75), "heart"),
    # LLaVA-1.5 / LLaVA-Med: floats 0..1 of the padded square.
    ("llava", PORTRAIT, "pad", 336, 1, "The heart is at [0.25, 0.1, 0.75, 0.9].",
     (431.75, 195.5, 1409.25, 1759.5), "cardiac silhouette"),
]


@pytest.mark.parametrize("fmt,frame,mode,size,multiple,text,expected,label", CASES,
                         ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}" for c in CASES])
def test_box_maps_to_original_pixels(fmt, frame, mode, size, multiple, text, expected, label):
    t = transform(frame, mode, size, multiple)
    parsed = parse_boxes(fmt, text, t, image_index=2, default_label="cardiac silhouette")
    assert parsed.rejected == ()
    assert len(parsed.boxes) == 1
    box = parsed.boxes[0]
    assert pixels(box, frame) == pytest.approx(expected, abs=1e-9)
    assert box.label == label
    assert box.image_index == 2
    start, end = parsed.spans[0]
    assert start < end <= len(text)


def test_every_format_has_a_case():
    assert {c[0] for c in CASES} == set(PARSERS)


def test_qwen_fit_sizes_are_multiples_of_28():
    assert (transform(LANDSCAPE, "fit", 448, 28).input_width,
            transform(LANDSCAPE, "fit", 448, 28).input_height) == (448, 364)
    assert (transform(PORTRAIT, "fit", 448, 28).input_width,
            transform(PORTRAIT, "fit", 448, 28).input_height) == (420, 448)


def test_boxes_are_clipped_to_the_frame_and_sorted():
    t = transform(LANDSCAPE, "pad", 896)
    # Whole padded square → whole frame; corners given in reverse order.
    parsed = parse_boxes("medgemma", '{"box_2d": [1000, 1000, 0, 0], "label": "all"}', t)
    assert pixels(parsed.boxes[0], LANDSCAPE) == pytest.approx((0, 0, 211, 169))


def test_malformed_fragments_are_rejected_and_the_rest_kept():
    t = transform(LANDSCAPE, "pad", 896)
    text = ('[{"box_2d": [1, 2, 3], "label": "three numbers"}, '
            '{"box_2d": [0, 0, 50, 1000], "label": "in the padding"}, '
            '{"box_2d": [500, 250, 750, 500], "label": "heart"}, {"box_2d": broken}]')
    parsed = parse_boxes("medgemma", text, t)
    assert [b.label for b in parsed.boxes] == ["heart"]
    assert len(parsed.rejected) == 3


@pytest.mark.parametrize("fmt", sorted(PARSERS))
def test_text_without_boxes_gives_no_boxes(fmt):
    parsed = parse_boxes(fmt, "No acute cardiopulmonary process. 3 views, 2 of them [ok].",
                         transform(PORTRAIT, "pad", 448))
    assert parsed.boxes == () and parsed.rejected == ()


@pytest.mark.parametrize("fmt,mode,tol", [
    ("medgemma", "pad", 1e-3), ("qwen2_5_vl", "fit", 2 / 364), ("qwen2_vl", "fit", 1e-3),
    ("qwen3_vl", "fit", 1e-3), ("medrega", "resize", 1e-3),
    ("minigpt", "resize", 1e-2), ("maira2", "crop", 1e-2), ("chexagent", "pad", 1e-2),
    ("paligemma", "resize", 1e-3), ("llava", "pad", 1e-2),
])
@pytest.mark.parametrize("frame", [PORTRAIT, LANDSCAPE])
def test_write_then_parse_round_trips(fmt, mode, tol, frame):
    t = transform(frame, mode, 448, {"qwen3_vl": 32}.get(fmt, 28) if mode == "fit" else 1)
    box = Box(label="nodule", x0=0.21, y0=0.32, x1=0.63, y1=0.74)
    parsed = parse_boxes(fmt, format_box(fmt, box, t), t, default_label="nodule")
    assert len(parsed.boxes) == 1, format_box(fmt, box, t)
    got = parsed.boxes[0]
    # Quantisation of the format, measured on the input, is at most `tol` of the input side;
    # on the original frame it scales by input side / original side.
    scale_x = t.input_width * t.scale_x / frame[0]
    scale_y = t.input_height * t.scale_y / frame[1]
    assert got.x0 == pytest.approx(box.x0, abs=tol * scale_x)
    assert got.x1 == pytest.approx(box.x1, abs=tol * scale_x)
    assert got.y0 == pytest.approx(box.y0, abs=tol * scale_y)
    assert got.y1 == pytest.approx(box.y1, abs=tol * scale_y)
    assert got.label == "nodule"


def test_minigpt_several_boxes_joined_by_delim():
    t = transform(LANDSCAPE, "resize", 448)
    parsed = parse_boxes("minigpt", "<p>nodule</p> {<10><10><20><20>}<delim>{<30><30><40><40>}<delim>"
                                    "<p>mass</p> {<50><50><60><60>}", t)
    assert [b.label for b in parsed.boxes] == ["nodule", "nodule", "mass"]


def test_medrega_one_ref_several_boxes():
    t = transform(PORTRAIT, "resize", 448)
    parsed = parse_boxes("medrega", "<ref>nodules</ref><box>[[10, 10, 20, 20], [30, 30, 40, 40]]</box>", t)
    assert len(parsed.boxes) == 2 and {b.label for b in parsed.boxes} == {"nodules"}


# --- Qwen: three generations, three conventions ------------------------------------------------------

def test_the_same_numbers_mean_different_places_in_each_qwen_generation():
    """``[112, 91, 224, 182]`` is input pixels for Qwen2.5-VL, a 0..1000 grid for Qwen2-VL and 3-VL."""
    t = transform(LANDSCAPE, "fit", 448, 28)
    json_text = '{"bbox_2d": [112, 91, 224, 182], "label": "x"}'
    markup = "<|object_ref_start|>x<|object_ref_end|><|box_start|>(112,91),(224,182)<|box_end|>"
    got = {fmt: pixels(parse_boxes(fmt, text, t).boxes[0], LANDSCAPE)
           for fmt, text in (("qwen2_5_vl", json_text), ("qwen3_vl", json_text), ("qwen2_vl", markup))}
    assert got["qwen2_5_vl"] == pytest.approx((52.75, 42.25, 105.5, 84.5))
    grid = (112 / 1000 * 211, 91 / 1000 * 169, 224 / 1000 * 211, 182 / 1000 * 169)
    assert got["qwen3_vl"] == pytest.approx(grid) and got["qwen2_vl"] == pytest.approx(grid)


def test_qwen2_vl_several_boxes_and_labels():
    t = transform(PORTRAIT, "fit", 448, 28)
    text = ("<|object_ref_start|>nodule<|object_ref_end|><|box_start|>(100,100),(200,200), (300,300),(400,400)"
            "<|box_end|>\n<|box_start|>(500,500),(600,600)<|box_end|>\n"
            "<|object_ref_start|>mass<|object_ref_end|><|box_start|>(700,700),(800,800)<|box_end|>")
    parsed = parse_boxes("qwen2_vl", text, t)
    assert [b.label for b in parsed.boxes] == ["nodule", "nodule", "nodule", "mass"]
    assert parsed.boxes[1].x0 == pytest.approx(0.3) and parsed.boxes[3].y1 == pytest.approx(0.8)


def test_qwen2_vl_unreadable_markup_is_rejected():
    t = transform(PORTRAIT, "fit", 448, 28)
    text = ("<|box_start|>(100,100),(200)<|box_end|> <|box_start|>(1,2),(3,4),(5,6)<|box_end|> "
            "<|box_start|>(100,100),(200,200)<|box_end|>")
    parsed = parse_boxes("qwen2_vl", text, t, default_label="heart")
    assert [b.label for b in parsed.boxes] == ["heart"] and len(parsed.rejected) == 2


@pytest.mark.parametrize("fmt,multiple", [("qwen2_vl", 28), ("qwen2_5_vl", 28), ("qwen3_vl", 32)])
@pytest.mark.parametrize("frame", [PORTRAIT, LANDSCAPE, (517, 300)])
def test_qwen_answer_about_the_prepared_image_lands_on_the_source_pixels(fmt, multiple, frame):
    """A bright rectangle drawn on a source frame, found on the image the model is actually given
    (prepare_image's output), written the way each generation answers, parses back onto the
    rectangle in source pixels: within one input pixel (scaled to source) plus resampling blur."""
    import numpy as np

    from inference.geometry import prepare_image

    width, height = frame
    x0, y0, x1, y1 = round(width * 0.3), round(height * 0.2), round(width * 0.7), round(height * 0.55)
    source = np.zeros((height, width), dtype=np.uint16)
    source[y0:y1, x0:x1] = 1000
    prepared = prepare_image(source, window=(500, 1000), size=448, mode="fit", multiple_of=multiple)
    seen = np.asarray(prepared.image)[..., 0] > 127
    rows, cols = np.nonzero(seen)
    ix0, iy0, ix1, iy1 = cols.min(), rows.min(), cols.max() + 1, rows.max() + 1  # input pixels
    w_in, h_in = prepared.image.size
    assert (w_in % multiple, h_in % multiple) == (0, 0)
    if fmt == "qwen2_5_vl":
        text = json.dumps({"bbox_2d": [int(ix0), int(iy0), int(ix1), int(iy1)], "label": "r"})
    else:
        grid = [round(1000 * v) for v in (ix0 / w_in, iy0 / h_in, ix1 / w_in, iy1 / h_in)]
        text = (json.dumps({"bbox_2d": grid, "label": "r"}) if fmt == "qwen3_vl" else
                f"<|object_ref_start|>r<|object_ref_end|><|box_start|>({grid[0]},{grid[1]}),"
                f"({grid[2]},{grid[3]})<|box_end|>")
    (box,) = parse_boxes(fmt, text, prepared.transform).boxes
    got = pixels(box, frame)
    tol_x = 1.5 * width / w_in + 1e-3 * width
    tol_y = 1.5 * height / h_in + 1e-3 * height
    assert got[0] == pytest.approx(x0, abs=tol_x) and got[2] == pytest.approx(x1, abs=tol_x)
    assert got[1] == pytest.approx(y0, abs=tol_y) and got[3] == pytest.approx(y1, abs=tol_y)
