"""WebDataset tar shards (img2dataset's output) and streamed ``datasets`` as sources (issue 37, part 3): encode_images
reads tar shards by a brace pattern, with captions from .txt or .json; a resumed encode and an encode over two
processes make the same store, byte for byte, as one uninterrupted encode; damaged members are skipped and named;
generate_pairs reads captions from the same shards; a streamed dataset resumes exactly."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from PIL import Image

import generate_pairs
from sd_dmd import encode_images
from sd_dmd.data import latents as L
from sd_dmd.data.images import TarSource, decode_image, _StreamCursor
from sd_dmd.data.latents import LatentStore, load_vae
from sd_dmd.data.pairs import pair_seed
from sd_dmd.data.prompts import PromptFilter, read_prompts
from sd_dmd.data.store import shard_path
from sd_dmd.data.tars import index_tar


def _image(seed: int, fmt: str = "JPEG", size=(24, 20)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


# the samples, as img2dataset writes them (KEY.jpg + KEY.txt + KEY.json) and with the variations it meets
SHARD0 = [{"__key__": f"00000{k:04d}", "jpg": _image(k), "txt": f"a photo {k}",
           "json": {"caption": f"a photo {k}", "aesthetic": 5.0 + k, "url": f"http://x/{k}.jpg"}} for k in range(4)]
SHARD1 = [{"__key__": "000010000", "png": _image(10, "PNG"), "json": {"caption": "caption in the json only"}},
          {"__key__": "000010001", "jpg": b"not an image at all", "txt": "a broken image"},
          {"__key__": "000010002", "webp": _image(12, "WEBP"), "txt": "a webp"},
          {"__key__": "000010003", "jpg": _image(13)}]  # no caption
SHARD2 = [{"__key__": f"00002{k:04d}", "jpg": _image(20 + k), "txt": f"third {k}"} for k in range(2)] + \
         [{"__key__": "000020002", "webp": _image(22, "WEBP", (64, 64)), "txt": "third 2"}]  # .txt first, then .webp
CAPTIONS = [f"a photo {k}" for k in range(4)] + ["caption in the json only", "a broken image", "a webp", None,
                                                  "third 0", "third 1", "third 2"]
GOOD = [0, 1, 2, 3, 4, 6, 8, 9]  # items with a latent
PATTERN = "{00000..00002}.tar"


def _write_shard(path: Path, samples) -> None:
    import webdataset as wds

    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def _member(path: Path, name: str) -> tarfile.TarInfo:
    with tarfile.open(path) as tf:
        return tf.getmember(name)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Three shards of 4, 4 and 3 samples; the last file cut in the middle of its last image (a killed download)."""
    d = tmp_path_factory.mktemp("wds")
    for name, samples in zip(("00000.tar", "00001.tar", "00002.tar"), (SHARD0, SHARD1, SHARD2)):
        _write_shard(d / name, samples)
    cut = _member(d / "00002.tar", "000020002.webp")
    (d / "00002.tar").write_bytes((d / "00002.tar").read_bytes()[:cut.offset_data + 300])
    # img2dataset writes a metadata parquet (no image bytes) beside each tar: a folder is read as its tars only
    (d / "00000.parquet").write_bytes(b"PAR1 metadata, not read")
    return d


def _args(images, model, out, *extra, shard_size=3):
    return ["--images", str(images), "--pretrained_model_name_or_path", str(model), "--output_dir", str(out),
            "--shard_size", str(shard_size), "--batch_size", "2", "--num_workers", "2", *extra]


def _files(store: Path) -> dict:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tar_store(shards, tiny_pipe_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tar_store") / "latents"
    encode_images.main(_args(shards / PATTERN, tiny_pipe_dir, out))
    return out


def _killed_at_shard(monkeypatch, n: int):
    """write_shard raises KeyboardInterrupt (a kill) instead of writing shard number ``n`` of this run."""
    real, calls = L.write_shard, []

    def write(path, rows, info):
        calls.append(path.name)
        if len(calls) == n:
            raise KeyboardInterrupt
        real(path, rows, info)

    monkeypatch.setattr(L, "write_shard", write)
    return calls


def test_tar_shards_are_encoded_with_their_captions_and_damage_named(tar_store, shards, tiny_pipe_dir, capsys):
    encode_images.main(_args(shards / PATTERN, tiny_pipe_dir, tar_store))  # a re-run: all done; prints its report
    log = capsys.readouterr().out
    assert "11 items (webdataset" in log and "11 items already done" in log
    # the cut shard: its last image is named by shard and key, as a warning and as a skipped item
    assert "warning: " + str(shards / "00002.tar") + ": 000020002.webp: truncated, 300 of" in log, log
    line = next(ln for ln in log.splitlines() if ln.startswith("skipped "))
    assert line.startswith("skipped 3 of 11 items (missing caption: 1, truncated: 1, unreadable: 1): "), line
    for named in ("00001.tar:000010001 (unreadable: UnidentifiedImageError", "00001.tar:000010003 (missing caption)",
                  "00002.tar:000020002 (truncated: 300 of"):
        assert named in line, line
    store = LatentStore(tar_store)
    cols = store.rows(range(len(store)))
    keys = [s["__key__"] for s in SHARD0 + SHARD1 + SHARD2]
    assert list(store.indices) == GOOD
    assert cols["source"] == [f"{k[:5]}.tar:{k}" for k in np.array(keys)[GOOD]]
    assert cols["caption"] == [CAPTIONS[i] for i in GOOD]  # .txt, or the .json's caption
    # the bytes read by byte range are the sample's image: its latent is the VAE's posterior sample for its seed
    vae = load_vae(tiny_pipe_dir).eval()
    for row, image in ((0, SHARD0[0]["jpg"]), (4, SHARD1[0]["png"]), (5, SHARD1[2]["webp"])):
        with torch.no_grad():
            want = L.encode_latents(vae, decode_image(image, 16)[None], [pair_seed(0, GOOD[row])])
        got = store.batch([row])[0]
        assert (got - want).abs().max() <= 2e-3 * want.abs().max(), row  # fp16 storage


def test_resumed_encode_is_byte_identical_to_one_uninterrupted(tar_store, shards, tiny_pipe_dir, tmp_path,
                                                               monkeypatch, capsys):
    out = tmp_path / "resumed"
    calls = _killed_at_shard(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        encode_images.main(_args(shards / PATTERN, tiny_pipe_dir, out))
    assert calls[-1] == "shard-00002.parquet" and not shard_path(out, 2).exists()
    shard_path(out, 2).with_name("shard-00002.parquet.tmp").write_bytes(b"torn")  # a write the kill cut short
    monkeypatch.undo()
    capsys.readouterr()
    encode_images.main(_args(shards / PATTERN, tiny_pipe_dir, out))
    log = capsys.readouterr().out
    assert "6 items already done" in log and "done: 5 items (3 encoded, 2 skipped)" in log, log
    assert _files(out) == _files(tar_store)  # every shard, the manifest and skipped.jsonl


class _Rank:
    """accelerate's process state, as process ``r`` of ``n`` sees it (the processes run one after the other)."""

    def __init__(self, r: int, n: int):
        self.process_index, self.num_processes, self.is_main_process = r, n, r == 0
        self.device = torch.device("cpu")

    def wait_for_everyone(self):
        pass


def test_two_processes_take_disjoint_shards_and_make_the_same_store(tar_store, shards, tiny_pipe_dir, tmp_path,
                                                                    monkeypatch):
    import sd_dmd.dist

    out, wrote, read = tmp_path / "two", {}, {}
    real_write, real_read = L.write_shard, TarSource.read
    for r in (0, 1):
        monkeypatch.setattr(sd_dmd.dist, "partial_state", lambda r=r: _Rank(r, 2))
        monkeypatch.setattr(L, "write_shard", lambda p, rows, info, r=r: wrote.setdefault(r, []).append(p.name) or
                            real_write(p, rows, info))
        monkeypatch.setattr(TarSource, "read", lambda self, idx, r=r: read.setdefault(r, []).extend(idx) or
                            real_read(self, idx))
        encode_images.main(_args(shards / PATTERN, tiny_pipe_dir, out))
    assert wrote == {0: ["shard-00000.parquet", "shard-00002.parquet"],
                     1: ["shard-00001.parquet", "shard-00003.parquet"]}
    assert not set(read[0]) & set(read[1]) and sorted(read[0] + read[1]) == [i for i in range(11) if CAPTIONS[i]]
    assert all(i // 3 in (0, 2) for i in read[0]) and all(i // 3 in (1, 3) for i in read[1])
    shards_of = {k: v for k, v in _files(out).items() if k.startswith("shards/")}
    assert shards_of == {k: v for k, v in _files(tar_store).items() if k.startswith("shards/")}


def test_damaged_shards_are_skipped_and_named(tmp_path):
    # a header that does not parse in the middle: the rest of that shard is lost, named by byte and last member
    _write_shard(tmp_path / "a.tar", SHARD2)
    bad = _member(tmp_path / "a.tar", "000020001.jpg")
    data = bytearray((tmp_path / "a.tar").read_bytes())
    data[bad.offset:bad.offset + 512] = b"\x07" * 512
    (tmp_path / "a.tar").write_bytes(bytes(data))
    samples, problems = index_tar(tmp_path / "a.tar")
    assert [s.key for s in samples] == ["000020000"]
    assert problems == [f"{tmp_path / 'a.tar'}: no valid tar header at byte {bad.offset}, after member "
                        f"000020000.txt (sample 000020000); the rest of the shard ({len(data) - bad.offset} bytes) "
                        "is skipped"]
    # not a tar at all, and a .json that is not JSON: named, the other shards' samples kept
    (tmp_path / "b.tar").write_bytes(b"<html>502 Bad Gateway</html>" * 40)
    _write_shard(tmp_path / "c.tar", [{"__key__": "k0", "jpg": _image(0), "json": b"{not json", "txt": "cap"}])
    src = TarSource([str(tmp_path / "*.tar")], progress=False)
    assert [src.item_id(i) for i in range(len(src))] == ["a.tar:000020000", "c.tar:k0"]
    assert src.captions == ["third 0", "cap"]
    assert any(p.startswith(f"{tmp_path / 'b.tar'}: not a tar file") for p in src.problems), src.problems
    assert any(p.startswith(f"{tmp_path / 'c.tar'}: k0.json: not JSON") for p in src.problems), src.problems


def test_tar_source_errors_are_one_line(shards, tiny_pipe_dir, tmp_path, capsys):
    assert_one_line_error(encode_images.main, _args(shards / "{00000..00004}.tar", tiny_pipe_dir, tmp_path / "o"),
                          capsys, f"2 of 5 shards missing (first: {shards / '00003.tar'})")
    assert_one_line_error(encode_images.main, _args(shards / PATTERN, tiny_pipe_dir, tmp_path / "o",
                                                    "--image_column", "tif"), capsys,
                          "no sample has a '.tif' member (extensions: ['jpg', 'json', 'png', 'txt', 'webp'])")
    assert_one_line_error(encode_images.main, _args(shards / PATTERN, tiny_pipe_dir, tmp_path / "o", "--streaming"),
                          capsys, "streaming: iterates a datasets dataset, not a webdataset source")
    assert_one_line_error(encode_images.main, _args(shards / PATTERN, tiny_pipe_dir, tmp_path / "o",
                                                    "--num_items", "3"), capsys, "num_items: declares")
    assert not (tmp_path / "o").exists()


# ----- prompts from the same shards ------------------------------------------------------------------------------
def test_prompts_from_tar_shards(shards, tiny_pipe_dir, tmp_path, capsys):
    prompts, stats = read_prompts(str(shards / PATTERN))
    assert prompts == [c for c in CAPTIONS if c] and stats.skipped == {"missing": 1}
    assert "1 damaged tar member(s) skipped (first: " + str(shards / "00002.tar") in stats.summary()
    assert read_prompts(str(shards))[0] == prompts  # a folder: its tars, not img2dataset's metadata parquet
    assert read_prompts(str(shards / "00000.tar"), caption_column="url")[0] == [f"http://x/{k}.jpg" for k in range(4)]
    kept, stats = read_prompts(str(shards / "00000.tar"), filters=PromptFilter(min_aesthetic=6.5))
    assert kept == ["a photo 2", "a photo 3"] and stats.skipped == {"aesthetic below minimum": 2}
    generate_pairs.main(["--prompts", str(shards / PATTERN), "--pretrained_model_name_or_path", tiny_pipe_dir,
                         "--output_dir", str(tmp_path / "pairs"), "--resolution", "16", "--num_inference_steps", "2",
                         "--num_pairs", "3", "--shard_size", "3"])
    log = capsys.readouterr().out
    assert f"warning: {shards / '00002.tar'}: 000020002.webp: truncated" in log, log
    assert [json.loads(x) for x in (tmp_path / "pairs" / "prompts.jsonl").read_text().splitlines()] == prompts


# ----- a streamed datasets dataset --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory) -> Path:
    import datasets

    d = tmp_path_factory.mktemp("ds") / "ds"
    images = [{"bytes": _image(30 + k, "PNG"), "path": None} for k in range(7)]
    images[4] = {"bytes": b"garbage", "path": None}
    ds = datasets.Dataset.from_dict({"image": images, "text": ["r0", "r1", None, "r3", "r4", "r5", "r6"]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "text": datasets.Value("string")}))
    ds.save_to_disk(str(d))
    return d


def test_streamed_dataset_resumes_exactly(saved_dataset, tiny_pipe_dir, tmp_path, monkeypatch, capsys):
    whole = tmp_path / "whole"
    encode_images.main(_args(saved_dataset, tiny_pipe_dir, whole))  # materialised: the reference
    out = tmp_path / "streamed"
    _killed_at_shard(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):  # counted first, then killed while writing shard 1
        encode_images.main(_args(saved_dataset, tiny_pipe_dir, out, "--streaming"))
    monkeypatch.undo()
    capsys.readouterr()
    # resumed with a declared count: no counting pass; the stream is entered at row 3 (IterableDataset.skip)
    encode_images.main(_args(saved_dataset, tiny_pipe_dir, out, "--streaming", "--num_items", "7"))
    log = capsys.readouterr().out
    assert "3 items already done" in log and "done: 4 items (3 encoded, 1 skipped)" in log, log
    assert "row 2 (missing caption); row 4 (unreadable" in log
    shards = {k: v for k, v in _files(out).items() if k.startswith("shards/")}
    assert shards == {k: v for k, v in _files(whole).items() if k.startswith("shards/")} and len(shards) == 3
    m = json.loads((out / "manifest.json").read_text())["source"]
    assert m["streaming"] is True and m["item_count_from"] == "a counting pass" and m["captions_sha256"]
    # the first N rows; a stream shorter than the count declared is named when it ends
    encode_images.main(_args(saved_dataset, tiny_pipe_dir, tmp_path / "four", "--streaming", "--num_items", "4"))
    four = LatentStore(tmp_path / "four")
    assert four.manifest["num_items"] == 4 and list(four.indices) == [0, 1, 3]
    assert four.rows([0, 1])["latent"].tobytes() == LatentStore(whole).rows([0, 1])["latent"].tobytes()
    assert_one_line_error(encode_images.main, _args(saved_dataset, tiny_pipe_dir, tmp_path / "nine", "--streaming",
                                                    "--num_items", "9"), capsys,
                          f"{saved_dataset}: the stream ended after 7 rows; --num_items declares 9")


def test_stream_cursor_reads_forward_and_restarts_behind():
    import datasets

    runs = []

    def rows():
        runs.append(1)
        for i in range(10):
            yield {"image": f"img{i}".encode(), "text": f"cap{i}"}

    cursor = _StreamCursor(datasets.IterableDataset.from_generator(rows), 10, "image", "text", "gen")
    assert [cursor.caption(i) for i in (2, 3, 5)] == ["cap2", "cap3", "cap5"] and len(runs) == 1
    assert cursor.image(5) == b"img5" and cursor.image(3) == b"img3" and len(runs) == 1  # held, not re-read
    assert cursor.image(4) == b"img4" and len(runs) == 2  # passed over unrequested: the stream restarts at it
    with pytest.raises(IndexError, match="row 10 out of range"):
        cursor.caption(10)
