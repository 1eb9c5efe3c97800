"""The face detectors of `fer-tune predict`: the default is the best one installed (MTCNN with facenet-pytorch, the
cascade without it), --detector picks one, a detector that cannot be loaded is one line, MTCNN finds a face where it
was put and frames it as FER2013's, the output names the detector, and only fer_tune.faces imports a detector."""

import csv
import importlib.machinery
import json
import sys
import types

import numpy as np
import pytest
from conftest import REAL_DATA

cv2 = pytest.importorskip("cv2")

from test_architecture import graph, imports, modules  # noqa: E402
from test_predict import face_pool, iou, paste, run, tiny_model  # noqa: E402

from fer_tune.common import FerTuneError  # noqa: E402
from fer_tune.faces import DETECTORS, MTCNN_FRAME, Detector, installed, load_detector  # noqa: E402

HAS_MTCNN = "mtcnn" in installed()
needs_mtcnn = pytest.mark.skipif(not HAS_MTCNN, reason="facenet-pytorch is not installed (pip install '.[faces]')")


def absent(monkeypatch) -> None:
    """facenet-pytorch as if it were not installed: neither found nor importable."""
    for name in [m for m in sys.modules if m.startswith("facenet_pytorch")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)


@pytest.fixture(scope="module")
def findable():
    """Faces of the pool that every installed detector finds alone at 120 px in a plain scene."""
    dets = [load_detector(name) for name in installed()]
    out = []
    for face in face_pool():
        scene = np.full((300, 300), 128, np.uint8)
        placed = paste(scene, face, 90, 90, 120)
        if all(any(iou(b, placed) >= 0.5 for b in d.detect(scene)) for d in dets):
            out.append(face)
    assert len(out) >= 3, f"only {len(out)} faces of the pool are found by {installed()}"
    return out


def test_the_default_is_the_best_installed_and_the_cascade_without_facenet(monkeypatch):
    assert DETECTORS == ("mtcnn", "cascade")
    best = load_detector()
    assert best.name == installed()[0] == ("mtcnn" if HAS_MTCNN else "cascade")
    assert load_detector("cascade").name == "cascade" and type(load_detector("cascade")) is Detector
    absent(monkeypatch)
    assert installed() == ["cascade"]
    assert load_detector().name == "cascade"
    with pytest.raises(
        FerTuneError, match=r"needs facenet_pytorch, not installed: pip install facenet-pytorch==2.5.3 "
    ):
        load_detector("mtcnn")
    with pytest.raises(FerTuneError, match="no face detector called 'retina'"):
        load_detector("retina")
    monkeypatch.undo()  # facenet-pytorch back, torch (which MTCNN runs on) away: an ONNX-only installation
    monkeypatch.setitem(sys.modules, "torch", None)
    assert installed() == ["cascade"] and load_detector().name == "cascade"
    with pytest.raises(FerTuneError, match=r"mtcnn face detector needs (facenet_pytorch and )?torch, not installed"):
        load_detector("mtcnn")


def test_a_detector_that_cannot_be_loaded_is_one_line_and_exit_2(tmp_path, monkeypatch):
    model = tiny_model(tmp_path)
    img = tmp_path / "face.png"
    cv2.imwrite(str(img), face_pool(1)[0])
    absent(monkeypatch)
    r = run("predict", model, img, "--detector", "mtcnn", process=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "the mtcnn face detector needs facenet_pytorch, not installed" in r.stderr
    # installed but broken: a package that is found and does not import
    broken = types.ModuleType("facenet_pytorch")
    broken.__spec__ = importlib.machinery.ModuleSpec("facenet_pytorch", None)
    monkeypatch.setitem(sys.modules, "facenet_pytorch", broken)
    assert installed() == ["mtcnn", "cascade"]
    for args in (("--detector", "mtcnn"), ()):  # named, or the default
        r = run("predict", model, img, *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (args, r.stderr)
        assert "the mtcnn face detector cannot be loaded (ModuleNotFoundError: " in r.stderr, r.stderr
        assert "or pass --detector cascade" in r.stderr
    r = run("predict", model, img, "--detector", "cascade", "--no-detect")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr


def test_the_output_names_the_detector_and_detector_cascade_forces_the_cascade(tmp_path, findable):
    model = tiny_model(tmp_path)
    scene = np.full((300, 300), 128, np.uint8)  # as findable's faces were found
    placed = paste(scene, findable[0], 90, 90, 120)
    cv2.imwrite(str(tmp_path / "scene.png"), scene)
    cv2.imwrite(str(tmp_path / "empty.png"), np.full((300, 400), 70, np.uint8))
    images = [tmp_path / "scene.png", tmp_path / "empty.png"]
    for args, name in (((), installed()[0]), (("--detector", "cascade"), "cascade")):
        r = run("predict", model, *images, "--json", *args)
        assert r.returncode == 0, r.stderr
        found, empty = (json.loads(line) for line in r.stdout.splitlines())
        assert found["detector"] == empty["detector"] == name and empty["faces"] == []
        assert len(found["faces"]) == 1 and found["faces"][0]["detector"] == name
        assert iou(found["faces"][0]["box"], placed) >= 0.4, found["faces"][0]["box"]
        r = run("predict", model, *images, *args)
        assert r.returncode == 0 and f" ({name}): " in r.stdout.splitlines()[0], r.stdout
        assert r.stdout.splitlines()[1] == f"{images[1]}: no face found by {name}"
        r = run("predict", model, *images, "--csv", tmp_path / "f.csv", *args)
        with open(tmp_path / "f.csv") as fh:
            assert [(row["detected"], row["detector"]) for row in csv.DictReader(fh)] == [("1", name)]
    # a face taken whole was found by no detector: a small image with none found, or any with --no-detect
    cv2.imwrite(str(tmp_path / "crop.png"), np.full((100, 100), 150, np.uint8))
    r = run("predict", model, tmp_path / "crop.png", "--json")
    result = json.loads(r.stdout)
    assert result["detector"] == installed()[0] and result["faces"][0]["detector"] is None
    assert result["faces"][0]["detected"] is False
    r = run("predict", model, images[0], "--json", "--no-detect")
    result = json.loads(r.stdout)
    assert result["detector"] is None and result["faces"][0]["detector"] is None


@needs_mtcnn
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="FER2013's framing is measured on its own faces (../shared)")
def test_mtcnn_finds_a_face_put_in_a_scene_and_frames_it_as_fer2013s(findable):
    mtcnn = load_detector("mtcnn")
    assert mtcnn.name == "mtcnn" and mtcnn.frame == MTCNN_FRAME
    rng = np.random.default_rng(0)
    shifts, scales = [], []
    originals = [cv2.resize(f, (48, 48), interpolation=cv2.INTER_AREA).ravel().astype(float) for f in findable[:6]]
    for k, face in enumerate(findable[:6]):
        scene = cv2.GaussianBlur(rng.normal(120, 30, (480, 640)).clip(0, 255).astype(np.uint8), (0, 0), 3)
        size = (90, 140, 220)[k % 3]
        x, y = int(rng.integers(0, 640 - size)), int(rng.integers(0, 480 - size))
        placed = paste(scene, face, x, y, size)
        faces = mtcnn.faces(scene)
        assert len(faces) == 1 and faces[0].detected, [f.box for f in faces]
        bx, by, bw, bh = faces[0].box
        dx, dy, scale = MTCNN_FRAME  # the box framed as FER2013's: a square about where the face was put
        side = max(bw, bh) * scale
        cx, cy = bx + bw / 2 + dx * bw, by + bh / 2 + dy * bw
        framed = (cx - side / 2, cy - side / 2, side, side)
        assert iou(framed, placed) >= 0.45, (faces[0].box, framed, placed)
        shifts.append(max(abs(cx - (x + size / 2)), abs(cy - (y + size / 2))) / size)
        scales.append(side / size)
        # the 48x48 crop is this face: closer to its own image than to the others'
        corr = [np.corrcoef(faces[0].pixels.ravel().astype(float), o)[0, 1] for o in originals]
        assert corr[k] > np.median(np.delete(corr, k)), corr
    # within tolerance in the median: the centre within 5 % of the face's side, the side within 8 %
    assert np.median(shifts) < 0.05 and abs(np.median(scales) - 1) < 0.08, (shifts, scales)
    # and nothing in scenes without a face
    plain = np.full((480, 640), 90, np.uint8)
    noise = cv2.GaussianBlur(rng.normal(128, 40, (480, 640)).clip(0, 255).astype(np.uint8), (0, 0), 3)
    assert mtcnn.faces(plain) == [] and mtcnn.faces(noise) == []


@needs_mtcnn
def test_mtcnn_finds_the_astronauts_face():
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    gray = np.asarray(Image.fromarray(data.astronaut()).convert("L"), dtype=np.uint8)
    boxes = load_detector("mtcnn").detect(gray)
    assert len(boxes) == 1 and iou(boxes[0], (178, 68, 90, 100)) >= 0.5, boxes


def test_only_faces_imports_a_detector_and_only_predict_and_the_commands_import_faces():
    mods, edges, _ = graph()
    detector_packages = {"facenet_pytorch", "dlib", "mediapipe"}
    for name, tree in modules().items():
        outside = {mod.split(".")[0] for mod, _ in imports(name, tree, False)}
        assert not outside & detector_packages or name == "fer_tune.faces", name
    users = {m for m, deps in edges.items() if "fer_tune.faces" in deps}
    assert users and all(m == "fer_tune.predict" or m.startswith("fer_tune.cli") for m in users), users
