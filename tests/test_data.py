import gzip
import json
import re

import numpy as np
import pytest
from conftest import REAL_DATA, write_challenge_csv
from PIL import Image

from fer_tune import data as fdata
from fer_tune.cli import main
from fer_tune.common import EMOTIONS, FerTuneError


def check(capsys, *args):
    code = main(["data", "check", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_csv_paper_and_standard(tmp_path):
    path = tmp_path / "fer2013.csv"
    images, labels, usage = write_challenge_csv(path)
    paper = fdata.load(path, "paper")
    std = fdata.load(path, "standard")
    assert paper.format == "csv" and paper.images.dtype == np.uint8 and paper.images.shape == (28, 48, 48)
    np.testing.assert_array_equal(paper.images, images)
    np.testing.assert_array_equal(paper.labels, labels)
    u = np.array(usage)
    # paper: val = PrivateTest, test = PublicTest; standard swaps them
    np.testing.assert_array_equal(paper.split, np.select([u == "Training", u == "PrivateTest"], [0, 1], 2))
    np.testing.assert_array_equal(std.split, np.select([u == "Training", u == "PublicTest"], [0, 1], 2))
    assert "val=PrivateTest" in paper.protocol_note and "test=PrivateTest" in std.protocol_note
    assert paper.fingerprint == std.fingerprint


def test_csv_gz_and_column_order(tmp_path):
    plain = tmp_path / "a.csv"
    images, labels, usage = write_challenge_csv(plain)
    gz = tmp_path / "a.csv.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    assert fdata.load(gz).fingerprint == fdata.load(plain).fingerprint
    # columns in another order, quoted pixels, CRLF line ends
    reordered = tmp_path / "b.csv"
    lines = ["emotion,Usage,pixels"] + [
        f'{l},{u},"{" ".join(map(str, img.reshape(-1)))}"' for img, l, u in zip(images, labels, usage)
    ]
    reordered.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    np.testing.assert_array_equal(fdata.load(reordered).images, images)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda L: L.__setitem__(slice(0, None), []), "is empty"),
        (lambda L: L.__setitem__(slice(1, None), []), "no data rows"),
        (lambda L: L.__setitem__(0, "emotion,pixel,Usage"), "missing pixels"),
        (lambda L: L.__setitem__(0, "emotion,pixels"), "missing usage"),
        (lambda L: L.__setitem__(3, L[3].rsplit(" ", 1)[0] + ",Training"), "line 4: pixels has 2303 values"),
        (lambda L: L.__setitem__(3, L[3].replace(" ", " 7 ", 1)), "line 4: pixels has 2305 values"),
        # one value moved from line 4 to line 5: the total is right, the per-row counts are not
        (
            lambda L: (
                L.__setitem__(3, L[3].rsplit(" ", 1)[0] + ",Training"),
                L.__setitem__(4, L[4].replace(" ", " 7 ", 1)),
            ),
            "line 4: pixels has 2303 values, expected 2304 (48x48); line 5: pixels has 2305 values",
        ),
        (lambda L: L.__setitem__(3, L[3].replace(" ", "  ", 1)), None),  # double space: still valid
        (lambda L: L.__setitem__(3, re.sub(r",\d+ ", ",1000 ", L[3], count=1)), "line 4: a pixel value is outside"),
        (lambda L: L.__setitem__(5, L[5].replace(" ", " 1.5 ", 1)), "line 6: pixel value '1.5' is not an integer"),
        (lambda L: L.__setitem__(5, L[5].replace(" ", " abc ", 1)), "line 6: pixel value 'abc'"),
        (
            lambda L: L.__setitem__(2, re.sub(r",\d+ ", ",300 ", L[2], count=1)),
            "line 3: a pixel value is outside 0-255",
        ),
        (lambda L: L.__setitem__(7, "7" + L[7][1:]), "line 8: emotion label '7' is not an integer 0-6"),
        (lambda L: L.__setitem__(7, "x" + L[7][1:]), "line 8: emotion label 'x'"),
        (lambda L: L.__setitem__(9, L[9].rsplit(",", 1)[0] + ",Validation"), "line 10: unknown Usage 'Validation'"),
        (lambda L: L.__setitem__(9, L[9] + ",extra"), "line 10: has 4 fields"),
    ],
)
def test_csv_bad_input(tmp_path, capsys, mutate, expected):
    path = tmp_path / "bad.csv"
    write_challenge_csv(path, mutate=mutate)
    code, out, err = check(capsys, path)
    if expected is None:
        assert code == 0, err
        return
    assert code == 2
    assert expected in err and str(path) in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_csv_skip_bad_rows(tmp_path, capsys):
    def mutate(L):
        L[3] = L[3].rsplit(" ", 1)[0] + ",Training"
        L[8] = "9" + L[8][1:]

    path = tmp_path / "bad.csv"
    images, labels, _ = write_challenge_csv(path, mutate=mutate)
    with pytest.raises(FerTuneError, match="line 4: .*; line 9: "):
        fdata.load(path)
    d = fdata.load(path, skip_bad_rows=True)
    assert len(d.labels) == 26
    assert d.skipped == [
        "line 4: pixels has 2303 values, expected 2304 (48x48)",
        "line 9: emotion label '9' is not an integer 0-6",
    ]
    keep = [i for i in range(28) if i not in (2, 7)]
    np.testing.assert_array_equal(d.images, images[keep])
    code, out, err = check(capsys, path, "--skip-bad-rows", "--json")
    assert code == 0 and "skipped 2 bad rows" in err and json.loads(out)["skipped"] == 2


def test_empty_split_is_an_error(tmp_path, capsys):
    path = tmp_path / "train_only.csv"
    write_challenge_csv(path, n_per_usage=(70, 0, 0))
    code, _, err = check(capsys, path)
    assert code == 2 and "the test split is empty under protocol 'paper'" in err and "PublicTest rows" in err
    write_challenge_csv(path, n_per_usage=(20, 0, 5))
    code, _, err = check(capsys, path, "--protocol", "standard")
    assert code == 2 and "the val split is empty" in err and "PublicTest rows, or enough train images" in err


def make_folders(root, prefixed=True, n=10, size=48, seed=0):
    rng = np.random.default_rng(seed)
    made = []
    for top, usages in (("train", ["Training"]), ("test", ["PublicTest", "PrivateTest"])):
        for k, emo in enumerate(EMOTIONS):
            d = root / top / (emo.upper() if k % 2 else emo)
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
                u = usages[i % len(usages)]
                name = f"{u}_{k}{i:04d}.png" if prefixed else f"im{k}{i:04d}.png"
                Image.fromarray(img).save(d / name)
                made.append((top, emo, u, img))
    return made


def test_folders_with_prefixes(tmp_path, capsys):
    made = make_folders(tmp_path / "fer")
    d = fdata.load(tmp_path / "fer", "paper")
    assert d.format == "folders" and len(d.labels) == len(made)
    c = d.counts()
    assert c["train"]["total"] == 70 and c["val"]["total"] == 35 and c["test"]["total"] == 35
    assert all(v == 10 for v in c["train"]["per_class"].values())
    code, out, _ = check(capsys, tmp_path / "fer", "--json", "--protocol", "standard")
    assert code == 0
    j = json.loads(out)
    assert j["format"] == "folders" and j["protocol"] == "standard" and j["splits"]["val"]["total"] == 35


def test_folders_without_prefixes_stratified_val(tmp_path):
    make_folders(tmp_path / "fer", prefixed=False, n=20)
    d = fdata.load(tmp_path / "fer")
    c = d.counts()
    assert c["val"]["total"] == 14 and all(v == 2 for v in c["val"]["per_class"].values())
    assert c["train"]["total"] == 126 and c["test"]["total"] == 140
    assert "10 % of train/" in d.protocol_note
    again = fdata.load(tmp_path / "fer", use_cache=False)
    np.testing.assert_array_equal(again.split, d.split)  # seeded


def test_folder_bad_inputs(tmp_path, capsys):
    root = tmp_path / "fer"
    make_folders(root, n=2)
    (root / "train" / "contempt").mkdir()
    code, _, err = check(capsys, root)
    assert code == 2 and "unknown emotion folder 'contempt'" in err
    (root / "train" / "contempt").rmdir()

    cls_dir = {p.name.lower(): p for p in (root / "train").iterdir()}
    bad = cls_dir["happy"] / "Training_bad.jpg"
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[:100])
    code, _, err = check(capsys, root)
    assert code == 2 and "Training_bad.jpg: unreadable or truncated image" in err
    code, _, err = check(capsys, root, "--skip-bad-rows")
    assert code == 0 and "skipped 1 bad rows/files" in err
    bad.unlink()

    big = cls_dir["sad"] / "Training_big.png"
    Image.fromarray(np.full((64, 64), 200, np.uint8)).save(big)
    code, _, err = check(capsys, root)
    assert code == 2 and "Training_big.png: image is 64x64, expected 48x48 (pass --resize" in err
    d = fdata.load(root, resize=True)
    assert d.images.shape[1:] == (48, 48) and (d.images == 200).all(axis=(1, 2)).sum() == 1


def test_missing_and_wrong_paths(tmp_path, capsys):
    code, _, err = check(capsys, tmp_path / "nope.csv")
    assert code == 2 and "does not exist" in err
    (tmp_path / "x.txt").write_text("hi")
    code, _, err = check(capsys, tmp_path / "x.txt")
    assert code == 2 and "expected a .csv" in err
    (tmp_path / "empty_dir").mkdir()
    code, _, err = check(capsys, tmp_path / "empty_dir")
    assert code == 2 and "train/ and/or test/" in err
    code, _, err = check(capsys, "synthetic:abc")
    assert code == 2 and "bad synthetic data spec" in err


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    path = tmp_path / "fer2013.csv"
    write_challenge_csv(path)
    first = fdata.load(path)
    calls = []
    real = fdata.parse_csv
    monkeypatch.setattr(fdata, "parse_csv", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = fdata.load(path)
    assert calls == [] and second.fingerprint == first.fingerprint
    np.testing.assert_array_equal(second.images, first.images)
    write_challenge_csv(path, seed=1)  # changed content (size and mtime change)
    third = fdata.load(path)
    assert calls == [1] and third.fingerprint != first.fingerprint


def test_synth_csv_roundtrip(tmp_path, capsys):
    out = tmp_path / "syn.csv"
    assert main(["data", "synth", str(out), "--n", "300", "--seed", "3"]) == 0
    d = fdata.load(out)
    syn = fdata.load("synthetic:300:3")
    np.testing.assert_array_equal(d.images, syn.images)
    np.testing.assert_array_equal(d.labels, syn.labels)
    np.testing.assert_array_equal(d.split, syn.split)
    conv = tmp_path / "conv.csv.gz"
    assert main(["data", "convert", str(out), str(conv)]) == 0
    assert fdata.load(conv).fingerprint == d.fingerprint


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_DATA.exists(), reason=f"FER2013 is absent ({REAL_DATA}; set FER2013_DIR)")
def test_real_fer2013_counts(capsys):
    code, out, err = check(capsys, REAL_DATA, "--json")
    assert code == 0, err
    j = json.loads(out)
    assert j["format"] == "folders" and j["protocol"] == "paper"
    s = j["splits"]
    assert (s["train"]["total"], s["val"]["total"], s["test"]["total"]) == (28709, 3589, 3589)
    assert s["train"]["per_class"] == {
        "angry": 3995,
        "disgust": 436,
        "fear": 4097,
        "happy": 7215,
        "sad": 4830,
        "surprise": 3171,
        "neutral": 4965,
    }
    # the second load comes from the cache
    import time

    t = time.perf_counter()
    d = fdata.load(REAL_DATA)
    assert time.perf_counter() - t < 1.0 and len(d.labels) == 35887
