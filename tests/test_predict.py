"""predict on photos: faces found where they were put (real FER2013 faces when the dataset is here, fer-tune's
synthetic faces otherwise), none in a scene without one, face crops taken whole, model.onnx checked against the
torch model and run without torch, JSON / CSV / annotated outputs, large photos searched on a smaller copy, bad
photos skipped and named (exit 3), and bad inputs in one line."""

import csv
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from conftest import REAL_DATA

cv2 = pytest.importorskip("cv2")

from conftest import run_in_process  # noqa: E402

from fer_tune.common import EMOTIONS  # noqa: E402
from fer_tune.faces import DETECT_MAX_SIDE, Detector, frame_crop, looks_like_a_crop  # noqa: E402


def face_pool(n: int = 60) -> list[np.ndarray]:
    """48x48 faces: PublicTest images of the real FER2013 when present, else synthetic ones."""
    if REAL_DATA.is_dir():
        from PIL import Image

        files = sorted((REAL_DATA / "test" / "happy").glob("PublicTest_*.jpg"))[:n]
        return [np.asarray(Image.open(f).convert("L"), dtype=np.uint8) for f in files]
    from fer_tune.synthetic import generate_dataset_arrays

    return list(generate_dataset_arrays(n, 5)[0])


def paste(scene: np.ndarray, face: np.ndarray, x: int, y: int, size: int) -> tuple[int, int, int, int]:
    scene[y : y + size, x : x + size] = cv2.resize(face, (size, size), interpolation=cv2.INTER_CUBIC)
    return (x, y, size, size)


def iou(a, b) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / (a[2] * a[3] + b[2] * b[3] - ix * iy)


@pytest.fixture(scope="module")
def detectable():
    """Faces of the pool that the cascade finds alone at 120 px in a plain scene (which faces it finds at all is
    the benchmark's question, benchmarks/bench_faces.py; here: where it says they are)."""
    det, out = Detector(), []
    for face in face_pool():
        scene = np.full((300, 300), 128, np.uint8)
        placed = paste(scene, face, 90, 90, 120)
        if any(iou(b, placed) >= 0.5 for b in det.detect(scene)):
            out.append(face)
    assert len(out) >= 5, f"only {len(out)} faces of the pool are found alone"
    return out


def test_faces_are_found_where_they_were_put(detectable):
    det = Detector()
    rng = np.random.default_rng(0)
    scene = cv2.GaussianBlur(rng.normal(120, 30, (480, 720)).clip(0, 255).astype(np.uint8), (0, 0), 3)
    placed = [paste(scene, detectable[0], 30, 40, 150), paste(scene, detectable[1], 300, 200, 110)]
    placed.append(paste(scene, detectable[2], 520, 60, 180))
    faces = det.faces(scene)  # the cascade may add a box beside a face (RESULTS.md: extra boxes per scene)
    assert 3 <= len(faces) <= 4 and all(f.detected for f in faces), [f.box for f in faces]
    assert [f.box[2] for f in faces] == sorted((f.box[2] for f in faces), reverse=True)  # largest first
    originals = [
        cv2.resize(scene[y : y + h, x : x + w], (48, 48), interpolation=cv2.INTER_AREA).ravel().astype(float)
        for x, y, w, h in placed
    ]
    for i, p in enumerate(placed):
        match = max(faces, key=lambda f: iou(f.box, p))
        assert iou(match.box, p) >= 0.5, (match.box, p)
        assert match.pixels.shape == (48, 48) and match.pixels.dtype == np.uint8
        if REAL_DATA.is_dir():  # (fer-tune's synthetic faces share one template: too alike to tell apart so)
            # the crop is this face, framed as it was placed: closer to its own image than to the other faces'
            corr = [np.corrcoef(match.pixels.ravel().astype(float), o)[0, 1] for o in originals]
            assert int(np.argmax(corr)) == i and corr[i] > 0.5, corr


def test_no_face_in_scenes_without_one():
    det = Detector()
    rng = np.random.default_rng(1)
    plain = np.full((480, 640), 90, np.uint8)
    noise = cv2.GaussianBlur(rng.normal(128, 40, (480, 640)).clip(0, 255).astype(np.uint8), (0, 0), 3)
    shapes = np.full((480, 640), 150, np.uint8)
    for k in range(12):
        cv2.rectangle(shapes, (40 * k, 30 * k), (40 * k + 60, 30 * k + 90), 40 + 15 * k, -1)
    for scene in (plain, noise, shapes):
        assert det.faces(scene) == []


def test_a_face_crop_is_taken_whole_and_a_small_box_in_it_is_not_the_face(detectable):
    det = Detector()
    crop = detectable[0]
    faces = det.faces(crop)
    assert len(faces) == 1 and faces[0].pixels.shape == (48, 48)
    if not faces[0].detected:
        assert faces[0].box == (0, 0, 48, 48) and np.array_equal(faces[0].pixels, crop)
    # a tiny face in a small image: no box fills it, so the image is taken whole
    small = np.full((100, 100), 128, np.uint8)
    paste(small, detectable[1], 5, 5, 30)
    faces = det.faces(small)
    assert looks_like_a_crop(small) and len(faces) == 1 and faces[0].box == (0, 0, 100, 100)
    assert not faces[0].detected
    # a box at the edge of an image is framed with the image's own border, never out of bounds
    edge = frame_crop(np.full((60, 60), 200, np.uint8), (40, 40, 30, 30), (0.0, 0.0, 1.5))
    assert edge.shape == (48, 48) and (edge == 200).all()


class RecordingCascade:
    """The cascade, recording the size of each image it searches; `boxes` in place of its answer when given."""

    def __init__(self, cascade, boxes=None):
        self.cascade, self.boxes, self.searched = cascade, boxes, []

    def detectMultiScale(self, img, **kw):
        self.searched.append(img.shape)
        return self.cascade.detectMultiScale(img, **kw) if self.boxes is None else np.array(self.boxes)


def test_a_large_photo_is_searched_on_a_smaller_copy_and_its_faces_cut_from_the_full_image(detectable):
    det = Detector()
    det.cascade = RecordingCascade(det.cascade)
    photo = np.full((2000, 3000), 120, np.uint8)
    placed = paste(photo, detectable[0], 1700, 800, 600)
    faces = det.faces(photo)
    assert det.cascade.searched == [(1067, DETECT_MAX_SIDE)]
    assert len(faces) == 1 and iou(faces[0].box, placed) >= 0.5, [f.box for f in faces]  # in the photo's pixels
    assert np.array_equal(faces[0].pixels, det.crop(photo, faces[0].box))  # cut from the full-resolution photo
    # a box found on the copy comes back scaled to the photo (3000 / 1600 = 1.875)
    det.cascade = RecordingCascade(det.cascade.cascade, boxes=[[100, 50, 200, 200]])
    assert det.detect(photo) == [(188, 94, 375, 375)]
    small = np.full((480, 640), 120, np.uint8)  # a photo no longer than DETECT_MAX_SIDE is searched as it is
    det.detect(small)
    assert det.cascade.searched == [(1067, DETECT_MAX_SIDE), (480, 640)]


def png_header(path, width: int, height: int) -> None:
    """A PNG that says it is width x height and holds no pixels: PIL opens it (the header), decoding fails."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def truncated_jpeg(path) -> None:
    """A JPEG cut in half: its header reads, its pixels do not decode."""
    noise = (np.random.default_rng(0).random((300, 400)) * 255).astype(np.uint8)
    data = cv2.imencode(".jpg", noise)[1].tobytes()
    path.write_bytes(data[: len(data) // 2])


def tiny_model(tmp_path):
    import torch

    from fer_tune.config import TrainConfig
    from fer_tune.models import create_model
    from fer_tune.train import save_checkpoint

    torch.manual_seed(0)
    cfg = TrainConfig(width=0.0625)
    state = {"config": cfg.to_dict(), "model": create_model(cfg.model, width=cfg.width).state_dict()}
    save_checkpoint(state, tmp_path / "model.pt")
    return tmp_path / "model.pt"


@pytest.mark.slow
def test_onnx_export_is_checked_and_gives_the_torch_models_answers_without_torch(tmp_path, detectable):
    from fer_tune.export import export_onnx
    from fer_tune.predict import OnnxModel, TorchModel, load_model

    torch_model = load_model(tiny_model(tmp_path))
    assert isinstance(torch_model, TorchModel)
    faces = np.stack(detectable[:5] + face_pool(70)[-5:])
    record = {"classes": list(EMOTIONS), "data": {"format": "fer2013", "test_crops": "ten"}}
    onnx_file = tmp_path / "model.onnx"
    check = export_onnx(torch_model.net, onnx_file, "ten", record, faces)
    assert check["status"] == "checked" and check["max_abs_logit_diff"] <= 1e-4 and check["checked_on"] == 10
    assert check["opset"] >= 17
    onnx_model = load_model(onnx_file)
    assert isinstance(onnx_model, OnnxModel) and onnx_model.trained_on["format"] == "fer2013"
    np.testing.assert_allclose(onnx_model.probabilities(faces), torch_model.probabilities(faces), atol=1e-5)
    # predict with model.onnx and the cascade never imports torch (nor Ray, nor Optuna; MTCNN runs on torch)
    img = tmp_path / "face.png"
    cv2.imwrite(str(img), detectable[0])
    code = (
        "import sys; from fer_tune.cli import main; "
        "rc = main(['predict', sys.argv[1], sys.argv[2], '--json', '--detector', 'cascade']); "
        "heavy = [m for m in ('torch', 'ray', 'optuna') if m in sys.modules]; print(heavy, file=sys.stderr); "
        "sys.exit(rc or (3 if heavy else 0))"
    )
    r = subprocess.run([sys.executable, "-c", code, str(onnx_file), str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["image"] == str(img) and len(result["faces"]) == 1
    want = torch_model.probabilities(result_pixels(img, result))
    got = [result["faces"][0]["probabilities"][e] for e in EMOTIONS]
    np.testing.assert_allclose(got, want[0], atol=1e-5)


def result_pixels(img, result) -> np.ndarray:
    from fer_tune.faces import read_gray, whole

    gray = read_gray(img)
    f = result["faces"][0]
    return (Detector().crop(gray, tuple(f["box"])) if f["detected"] else whole(gray).pixels)[None]


def run(*args, process=False):
    """`fer-tune ARGS` in this process (conftest.run_in_process), or as a user runs it with `process=True`."""
    if process:
        argv = [sys.executable, "-m", "fer_tune.cli", *map(str, args)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=300)
    return run_in_process(dict(os.environ), [*map(str, args)])


def test_predict_outputs_folders_globs_csv_and_annotations(tmp_path, detectable):
    model = tiny_model(tmp_path)
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    group = np.full((360, 560), 110, np.uint8)
    boxes = [paste(group, detectable[0], 20, 30, 140), paste(group, detectable[3], 300, 120, 160)]
    cv2.imwrite(str(photos / "group.png"), group)
    cv2.imwrite(str(photos / "more" / "empty.jpg"), np.full((300, 400), 70, np.uint8))
    cv2.imwrite(str(photos / "crop.png"), detectable[2])
    (photos / "notes.txt").write_text("not an image, not picked from a folder")

    r = run("predict", model, photos, "--json")
    assert r.returncode == 0, r.stderr
    results = [json.loads(line) for line in r.stdout.splitlines()]
    by_name = {res["image"].rsplit("/", 1)[-1]: res for res in results}
    assert sorted(by_name) == ["crop.png", "empty.jpg", "group.png"]
    assert by_name["empty.jpg"]["faces"] == []
    assert len(by_name["crop.png"]["faces"]) == 1
    found = by_name["group.png"]["faces"]
    assert len(found) == 2 and all(f["detected"] for f in found)
    for b in boxes:
        assert max(iou(f["box"], b) for f in found) >= 0.5
    for f in found:
        assert sum(f["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert f["label"] == max(f["probabilities"], key=f["probabilities"].get)

    # a glob the shell left alone, CSV rows, annotated images; the text output names each face
    r = run("predict", model, str(photos / "*.png"), "--csv", tmp_path / "faces.csv", "--annotate", tmp_path / "ann")
    assert r.returncode == 0 and r.stdout == "", r.stderr
    with open(tmp_path / "faces.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [row["image"].rsplit("/", 1)[-1] for row in table] == ["crop.png", "group.png", "group.png"]
    assert [row["face"] for row in table] == ["1", "1", "2"]
    assert [int(table[1][k]) for k in ("x", "y", "w", "h")] == found[0]["box"]
    assert {row["label"] for row in table} <= set(EMOTIONS) and set(table[0]) >= {f"p_{e}" for e in EMOTIONS}
    annotated = cv2.imread(str(tmp_path / "ann" / "group.png"))
    assert annotated.shape == (360, 560, 3)
    x, y, w, h = found[0]["box"]
    edge = annotated[y + h // 2, x : x + 2]  # the box's left edge (2 px) is drawn in colour
    assert (edge[:, 0].astype(int) - edge[:, 2].astype(int)).max() < -100
    small = cv2.imread(str(tmp_path / "ann" / "crop.png"))
    assert min(small.shape[:2]) >= 240  # enlarged so its label fits
    r = run("predict", model, photos / "group.png")
    assert r.returncode == 0 and r.stdout.count("\n") == 2 and "face 1 of 2 at x=" in r.stdout
    r = run("predict", model, photos / "more" / "empty.jpg", "--no-detect")
    assert r.returncode == 0 and r.stdout.startswith(f"{photos / 'more' / 'empty.jpg'}: ") and "no face" not in r.stdout


@pytest.mark.slow  # a fer-tune process
def test_predict_bad_inputs_are_one_line(tmp_path, detectable):
    model = tiny_model(tmp_path)
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), detectable[0])
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    (tmp_path / "fake.onnx").write_bytes(b"not an onnx model")
    (tmp_path / "model.pt2").write_bytes(b"PK")
    (tmp_path / "empty").mkdir()
    cases = [
        (
            (model, tmp_path / "bad.jpg", tmp_path / "missing.png"),
            ["bad.jpg: not a readable image", "missing.png: no such file"],
        ),
        ((model, tmp_path / "empty"), ["no images in"]),
        ((model, str(tmp_path / "nothing*.png")), ["nothing*.png: no such file"]),
        ((tmp_path / "fake.onnx", good), ["fake.onnx is not an ONNX model onnxruntime can load"]),
        ((good, good), ["is not a fer-tune model: it is a PNG image", "usage: fer-tune predict MODEL IMAGE..."]),
        ((model, good, "--annotate", tmp_path), ["holds images being classified"]),
        ((tmp_path / "model.pt2", good), ["is a torch.export program of the network alone"]),
    ]
    for i, (args, wanted) in enumerate(cases):
        r = run("predict", *args, process=i == 0)  # the first as a user's process: exit 2, one line, no traceback
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (args, r.stderr)
        for w in wanted:
            assert w in r.stderr, (args, r.stderr)
    # an ONNX model that fer-tune did not export
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["faces"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("faces", TensorProto.FLOAT, [None, 7])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 7])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "other.onnx"))
    r = run("predict", tmp_path / "other.onnx", good)
    assert r.returncode == 2 and "not one fer-tune exported" in r.stderr and r.stderr.count("\n") == 1


def test_predict_skips_bad_photos_names_each_and_exits_3(tmp_path, detectable):
    from PIL import Image

    model = tiny_model(tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    group = np.full((360, 560), 110, np.uint8)
    paste(group, detectable[0], 20, 30, 140)
    cv2.imwrite(str(photos / "group.png"), group)
    cv2.imwrite(str(photos / "crop.png"), detectable[1])
    truncated_jpeg(photos / "truncated.jpg")
    (photos / "notes.jpg").write_text("not an image")
    cv2.imwrite(str(photos / "big.png"), np.full((500, 600), 90, np.uint8))  # 300,000 pixels
    missing = tmp_path / "missing.png"
    bad = {
        "truncated.jpg": "truncated or damaged image (image file is truncated",
        "notes.jpg": "not a readable image (UnidentifiedImageError)",
        "big.png": "600x500 = 300,000 pixels, more than the limit of 250,000 (--max-pixels)",
        "missing.png": "no such file",
    }
    limit = Image.MAX_IMAGE_PIXELS
    r = run("predict", model, photos, missing, "--max-pixels", 250_000, "--json")
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    assert [json.loads(line)["image"].rsplit("/", 1)[-1] for line in r.stdout.splitlines()] == ["crop.png", "group.png"]
    for name, why in bad.items():
        assert r.stderr.count(name) == 1 and f"skipped {tmp_path}/" in r.stderr and f"{name}: {why}" in r.stderr
    assert "4 of 6 image(s) skipped, 2 classified" in r.stderr and r.stderr.count("\n") == 5
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's own limit is left as it was

    # CSV and annotations of the others; the text output
    r = run(
        "predict", model, photos, "--max-pixels", 250_000, "--csv", tmp_path / "f.csv", "--annotate", tmp_path / "a"
    )
    assert r.returncode == 3 and r.stdout == "", r.stderr
    with open(tmp_path / "f.csv") as fh:
        assert [row["image"].rsplit("/", 1)[-1] for row in csv.DictReader(fh)] == ["crop.png", "group.png"]
    assert sorted(f.name for f in (tmp_path / "a").iterdir()) == ["crop.png", "group.png"]
    r = run("predict", model, photos / "group.png", photos / "truncated.jpg")
    assert r.returncode == 3 and r.stdout.startswith(f"{photos / 'group.png'}: face at x="), r.stderr

    # a header that claims 20000x20000 (PIL's own check would raise): the default limit, checked before decoding
    png_header(photos / "huge.png", 20000, 20000)
    r = run("predict", model, photos / "group.png", photos / "huge.png")
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    assert "huge.png: 20000x20000 = 400,000,000 pixels, more than the limit of 100,000,000 (--max-pixels)" in r.stderr


@pytest.mark.slow  # a fer-tune process
def test_predict_with_every_image_skipped_is_one_error_line(tmp_path):
    model = tiny_model(tmp_path)
    truncated_jpeg(tmp_path / "truncated.jpg")
    (tmp_path / "notes.png").write_text("not an image")
    png_header(tmp_path / "huge.png", 20000, 20000)
    png_header(tmp_path / "header-only.png", 9500, 9500)  # above PIL's own limit (a warning), below fer-tune's
    images = [tmp_path / name for name in ("truncated.jpg", "notes.png", "huge.png", "header-only.png")]
    r = run("predict", model, *images, process=True)  # as a user's process: PIL's warnings would show
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("fer-tune: error: no image can be classified (4 skipped): ") and r.stdout == ""
    for name in ("truncated.jpg: truncated", "notes.png: not a readable", "huge.png: 20000x20000", "header-only.png"):
        assert r.stderr.count(name) == 1, r.stderr
    r = run("predict", model, tmp_path / "notes.png", "--max-pixels", 0)
    assert r.returncode == 2 and "--max-pixels must be >= 1" in r.stderr
