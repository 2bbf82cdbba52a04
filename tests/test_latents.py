"""python -m sd_dmd.encode_images on the tiny offline VAE: every source kind, exact latents, bad images, resume."""
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import assert_one_line_error
from PIL import Image

from sd_dmd import encode_images
from sd_dmd.data.images import BadImage, decode_image
from sd_dmd.errors import LatentsError
from sd_dmd.data.latents import LatentStore, load_vae, vae_identity
from sd_dmd.data.pairs import pair_seed
from sd_dmd.data.store import ROW_GROUP_ROWS, shard_path

ROOT = Path(__file__).resolve().parents[1]
# good images: (name, size, mode, format); the VAE of the tiny pipeline works at 16 px (latents 4x8x8)
GOOD = [("a.png", (20, 24), "RGB", "PNG"), ("b.jpg", (32, 16), "RGB", "JPEG"), ("c.png", (16, 16), "RGBA", "PNG"),
        ("sub/d.webp", (40, 30), "RGB", "WEBP"), ("sub/e.png", (17, 23), "L", "PNG")]
CAPTIONS = {"a.png": "a red cube", "b.jpg": "two cats, on a sofa", "c.png": "a blue sphere",
            "sub/d.webp": "the number seven", "sub/e.png": "a tree", "nocap.png": None, "empty.png": "an empty file",
            "trunc.jpg": "a truncated photo", "garbage.jpg": "not an image"}


def _image_bytes(size, mode="RGB", fmt="PNG", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], len(mode) if mode != "L" else 1), dtype=np.uint8)
    img = Image.fromarray(arr.squeeze(-1) if mode == "L" else arr, mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _run(argv):
    encode_images.main(argv)


def _args(images, model, out, *extra, shard_size=3, batch_size=2):
    return ["--images", str(images), "--pretrained_model_name_or_path", str(model), "--output_dir", str(out),
            "--shard_size", str(shard_size), "--batch_size", str(batch_size), "--num_workers", "2", *extra]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """5 good images (PNG, JPEG, RGBA, WEBP, grey, one in a subfolder) and 4 bad items, captions in .txt files."""
    d = tmp_path_factory.mktemp("images")
    (d / "sub").mkdir()
    for k, (name, size, mode, fmt) in enumerate(GOOD):
        (d / name).write_bytes(_image_bytes(size, mode, fmt, seed=k))
    (d / "nocap.png").write_bytes(_image_bytes((16, 16)))
    (d / "empty.png").write_bytes(b"")
    (d / "trunc.jpg").write_bytes(_image_bytes((64, 64), fmt="JPEG")[:600])
    (d / "garbage.jpg").write_bytes(b"this is not an image")
    for name, cap in CAPTIONS.items():
        if cap is not None:
            (d / name).with_suffix(".txt").write_text(cap + "\n")
    return d


@pytest.fixture(scope="module")
def folder_store(image_folder, tiny_pipe_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "latents"
    _run(_args(image_folder, tiny_pipe_dir, out))
    return out


@pytest.fixture(scope="module")
def tiny_vae(tiny_pipe_dir):
    return load_vae(tiny_pipe_dir).eval()


def _sorted_items():
    return sorted(CAPTIONS)  # the source order: relative paths, sorted


def test_folder_with_txt_captions(folder_store, image_folder, capsys):
    items = _sorted_items()
    m = json.loads((folder_store / "manifest.json").read_text())
    assert m["num_items"] == 9 and m["latent_shape"] == [4, 8, 8] and m["resolution"] == 16
    assert m["source"]["kind"] == "folder" and m["source"]["item_count"] == 9 and m["latent_dtype"] == "float16"
    store = LatentStore(folder_store)
    good = [items.index(n) for n, *_ in GOOD]
    assert list(store.indices) == sorted(good)  # skipped items have no row
    cols = store.rows(range(len(store)))
    assert cols["source"] == [items[i] for i in sorted(good)]
    assert cols["caption"] == [CAPTIONS[items[i]] for i in sorted(good)]
    latents, captions = store.batch([1, 0])
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32 and captions == cols["caption"][1::-1]
    # 9 items in shards of 3: every shard records what it covers, also shard 1, whose 3 items were all bad
    infos = [json.loads(pq.read_metadata(shard_path(folder_store, k)).metadata[b"sd_dmd.latents.shard"])
             for k in range(3)]
    assert [(i["first_index"], i["items"]) for i in infos] == [(0, 3), (3, 3), (6, 3)]
    assert [i["rows"] for i in infos] == [3, 0, 2] and sum(len(i["skipped"]) for i in infos) == 4
    assert pq.read_metadata(shard_path(folder_store, 1)).num_rows == 0


def test_readable_with_datasets(folder_store, tmp_path):
    from datasets import load_dataset

    # shard 1 has no rows (and no row group: `datasets` fails on a 0-row group)
    ds = load_dataset("parquet", data_files=str(folder_store / "shards" / "*.parquet"), split="train",
                      cache_dir=str(tmp_path))
    assert len(ds) == 5 and ds.column_names == ["index", "caption", "source", "latent", "row_sha256"]
    row = ds[4]
    lat = np.frombuffer(row["latent"], dtype=np.float16).reshape(4, 8, 8)
    assert np.array_equal(lat, LatentStore(folder_store).rows([4])["latent"][0]) and row["source"] == "sub/e.png"


def test_bad_images_are_skipped_counted_and_named(image_folder, tiny_pipe_dir, tmp_path, capsys):
    _run(_args(image_folder, tiny_pipe_dir, tmp_path / "s"))
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("skipped "))
    assert line.startswith("skipped 4 of 9 items (missing caption: 1, unreadable: 2, zero-size: 1): ")
    for name in ("nocap.png (missing caption)", "empty.png (zero-size", "trunc.jpg (unreadable: OSError",
                 "garbage.jpg (unreadable: UnidentifiedImageError"):
        assert name in line, line
    assert "store complete: 5 latents of 9 items" in out
    rows = [json.loads(x) for x in (tmp_path / "s" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(r["source"] for r in rows) == ["empty.png", "garbage.jpg", "nocap.png", "trunc.jpg"]


def test_latent_is_the_vae_posterior_sample_for_the_items_seed(folder_store, image_folder, tiny_vae):
    store = LatentStore(folder_store)
    row = 3
    i, src = int(store.indices[row]), store.rows([row])["source"][0]
    x = decode_image((image_folder / src).read_bytes(), 16)[None]
    with torch.no_grad():
        dist = tiny_vae.encode(x).latent_dist
        want = dist.sample(torch.Generator("cpu").manual_seed(pair_seed(0, i))) * tiny_vae.config.scaling_factor
    got = store.batch([row])[0]
    ulp = torch.from_numpy(np.spacing(np.abs(want.numpy()).astype(np.float16)).astype(np.float32))
    assert torch.all((got - want).abs() <= ulp + 1e-5)  # fp16 storage; encoded in a batch of 2, here alone
    other = dist.sample(torch.Generator("cpu").manual_seed(pair_seed(0, i + 1))) * tiny_vae.config.scaling_factor
    assert (got - other).abs().max() > 1e-2  # the seed matters: the latent is a sample, not the mean


def test_decode_crops_the_centre_and_composites_alpha_over_white():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)
    arr[:, 10:30] = (0, 255, 0)
    arr[:, 30:] = (0, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    x = decode_image(buf.getvalue(), 8)
    assert x.shape == (3, 8, 8) and torch.allclose(x, torch.tensor([-1.0, 1.0, -1.0])[:, None, None], atol=1e-6)
    buf = io.BytesIO()
    Image.new("RGBA", (5, 5), (0, 0, 0, 0)).save(buf, format="PNG")
    assert torch.equal(decode_image(buf.getvalue(), 4), torch.ones(3, 4, 4))
    with pytest.raises(BadImage, match="zero-size"):
        decode_image(b"", 8)


def test_folder_with_csv_or_metadata_jsonl_captions(image_folder, tiny_pipe_dir, tmp_path):
    d = tmp_path / "imgs"
    shutil.copytree(image_folder, d, ignore=shutil.ignore_patterns("*.txt"))
    with open(tmp_path / "caps.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption"])
        w.writerows([[n, f"csv {c}"] for n, c in CAPTIONS.items() if c is not None])
    _run(_args(d, tiny_pipe_dir, tmp_path / "csv", "--captions", str(tmp_path / "caps.csv")))
    caps = LatentStore(tmp_path / "csv").rows(range(5))["caption"]
    assert caps == [f"csv {CAPTIONS[n]}" for n in sorted(n for n, *_ in GOOD)]  # "two cats, on a sofa" kept whole
    # HF imagefolder's metadata.jsonl is found by itself; a bare file name matches an image in a subfolder
    (d / "metadata.jsonl").write_text("".join(json.dumps({"file_name": Path(n).name, "text": f"jsonl {c}"}) + "\n"
                                              for n, c in CAPTIONS.items() if c is not None))
    _run(_args(d, tiny_pipe_dir, tmp_path / "jsonl"))
    caps = LatentStore(tmp_path / "jsonl").rows(range(5))["caption"]
    assert caps == [f"jsonl {CAPTIONS[n]}" for n in sorted(n for n, *_ in GOOD)]


def test_parquet_with_image_bytes(tiny_pipe_dir, tmp_path, capsys):
    d = tmp_path / "laion"
    d.mkdir()
    imgs = [_image_bytes((24, 20), seed=s) for s in range(5)]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    # HF layout: image struct {bytes, path} + TEXT, in row groups of 2; img2dataset layout: jpg binary + caption
    pq.write_table(pa.table({"image": pa.array([{"bytes": b, "path": None} for b in imgs[:3]] +
                                               [{"bytes": None, "path": None}], struct),
                             "TEXT": ["p0", "p1", None, "p3"]}), d / "part-0.parquet", row_group_size=2)
    pq.write_table(pa.table({"jpg": pa.array([imgs[3], b"\xff\xd8garbage", imgs[4]], pa.binary()),
                             "caption": ["q0", "q1", "q2"]}), d / "part-1.parquet")
    _run(_args(str(d / "*.parquet"), tiny_pipe_dir, tmp_path / "out", shard_size=4))
    out = capsys.readouterr().out
    assert ("skipped 3 of 7 items (missing caption: 1, missing image: 1, unreadable: 1): part-0.parquet:2 (missing "
            "caption); part-0.parquet:3 (missing image: no bytes and no path); part-1.parquet:1 (unreadable") in out
    store = LatentStore(tmp_path / "out")
    cols = store.rows(range(len(store)))
    assert cols["source"] == ["part-0.parquet:0", "part-0.parquet:1", "part-1.parquet:0", "part-1.parquet:2"]
    assert cols["caption"] == ["p0", "p1", "q0", "q2"] and list(store.indices) == [0, 1, 4, 6]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["source"]["image_columns"] == ["image", "jpg"]
    assert_one_line_error(encode_images.main, _args(d / "part-1.parquet", tiny_pipe_dir, tmp_path / "o2",
                                                     "--image_column", "png"), capsys, "image column 'png' not found")


def test_datasets_saved_to_disk(tiny_pipe_dir, tmp_path):
    import datasets

    imgs = [Image.open(io.BytesIO(_image_bytes((18, 18), seed=s))) for s in range(3)]
    ds = datasets.Dataset.from_dict({"image": imgs, "text": ["x0", "", "x2"]}, features=datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    _run(_args(tmp_path / "ds", tiny_pipe_dir, tmp_path / "out"))
    store = LatentStore(tmp_path / "out")
    cols = store.rows(range(len(store)))
    assert cols["source"] == ["row 0", "row 2"] and cols["caption"] == ["x0", "x2"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["source"]["kind"] == "dataset"


def test_resume_after_deleting_a_shard_redoes_only_it(folder_store, image_folder, tiny_pipe_dir, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(folder_store, out)
    before = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    shard_path(out, 2).unlink()
    shard_path(out, 2).with_name("shard-00002.parquet.tmp").write_bytes(b"torn")  # a killed write
    capsys.readouterr()
    _run(_args(image_folder, tiny_pipe_dir, out))
    log = capsys.readouterr().out
    # shard 1 (3 bad items, no rows) counts as done: its footer says it covers items 3-5
    assert "6 items already done" in log and "done: 3 items (2 encoded, 1 skipped)" in log, log
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == before  # byte-identical, no .tmp left
    assert (out / "skipped.jsonl").read_bytes() == (folder_store / "skipped.jsonl").read_bytes()


def test_changed_resolution_or_source_is_refused(folder_store, image_folder, tiny_pipe_dir, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(folder_store, out)
    manifest = (out / "manifest.json").read_bytes()
    assert_one_line_error(encode_images.main, _args(image_folder, tiny_pipe_dir, out, "--resolution", "32"), capsys,
                          "resolution 16 -> 32")
    more = tmp_path / "more"
    shutil.copytree(image_folder, more)
    (more / "z.png").write_bytes(_image_bytes((16, 16)))
    assert_one_line_error(encode_images.main, _args(more, tiny_pipe_dir, out), capsys,
                          "item count 9 -> 10; item names changed; captions changed")
    assert (out / "manifest.json").read_bytes() == manifest


def test_bad_arguments_are_one_line_errors(tiny_pipe_dir, tmp_path, capsys):
    assert_one_line_error(encode_images.main, ["--output_dir", str(tmp_path / "o")], capsys, "images: a folder")
    assert_one_line_error(encode_images.main, _args(tmp_path / "nope", tiny_pipe_dir, tmp_path / "o"), capsys,
                          "nope: not a folder")
    assert_one_line_error(encode_images.main, _args(tmp_path, tmp_path, tmp_path / "o", "--source", "folder"),
                          capsys, "folder holds no images")
    encode_images.main(["--source", "digits", "--output_dir", str(tmp_path / "o"), "--dry-run"])
    assert "source: digits" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def test_digits_source(tmp_path, tiny_vae, capsys):
    from sd_dmd.data.digits import TEACHER_DIR

    _run(["--source", "digits", "--output_dir", str(tmp_path / "d"), "--batch_size", "256", "--shard_size", "512"])
    assert "store complete: 1797 latents of 1797 items" in capsys.readouterr().out
    store = LatentStore(tmp_path / "d")
    assert len(store) == 1797 and store.manifest["latent_shape"] == [4, 8, 8] and store.manifest["resolution"] == 32
    latents, captions = store.batch(range(0, 1797, 100))
    assert latents.shape == (18, 4, 8, 8) and captions[0] == "zero"  # digit 0, its template "{w}"
    assert 0.8 < store.batch(range(512))[0].std() < 1.2  # scaled by the VAE's scaling_factor
    digits_vae = load_vae(str(TEACHER_DIR))
    store.check_compatible(vae_identity(digits_vae), 32)
    with pytest.raises(LatentsError, match="another VAE"):
        store.check_compatible(vae_identity(tiny_vae), 32)
    with pytest.raises(LatentsError, match="latents are at resolution 32, training runs at 64"):
        store.check_compatible(vae_identity(digits_vae), 64)


def test_reader_reads_only_the_row_groups_of_a_batch(folder_store, monkeypatch):
    store = LatentStore(folder_store)
    calls = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, g, **kw: calls.append(g) or real(self, g, **kw))
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **kw: pytest.fail("read a whole shard"))
    store.batch([0, 4])
    assert len(calls) == 2 and ROW_GROUP_ROWS == 16
    with pytest.raises(IndexError, match="row 5 out of range"):
        store.batch([5])


def test_two_processes_make_the_same_store(folder_store, image_folder, tiny_pipe_dir, tmp_path):
    out = tmp_path / "two"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sd_dmd.encode_images",
           *_args(image_folder, tiny_pipe_dir, out)]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "3 shards over 2 process(es)" in res.stdout and "done: 9 items (5 encoded, 4 skipped) by 2" in res.stdout
    a, b = LatentStore(folder_store), LatentStore(out)
    assert list(a.indices) == list(b.indices)
    # another process count batches other images together: fp32 sums in another order may round to the
    # neighbouring fp16 value (as in test_pairs.py), never further
    x, y = a.rows(range(5))["latent"], b.rows(range(5))["latent"]
    ulp = np.spacing(np.abs(x)).astype(np.float32)
    assert (np.abs(x.astype(np.float32) - y.astype(np.float32)) - ulp).max() <= 1e-4
