"""A corrupted shard is never served as data (issue 25, item 4): each row's digest, checked on reads, on resume and by
``python -m sd_dmd.verify_store``; stores written before digests still read, with a note."""
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import generate_pairs
from sd_dmd import encode_images
from sd_dmd.data.latents import LatentStore
from sd_dmd.data.pairs import PairsStore
from sd_dmd.data.store import DIGEST_COLUMN, ROW_GROUP_ROWS, shard_path
from sd_dmd.errors import LatentsError, PairsError
from sd_dmd.verify_store import main as verify_main


def flip_a_latent_byte(shard: Path, group: int = 0) -> None:
    """Flip one byte in the middle of the ``latent`` column chunk of row group ``group`` (its values: the dictionary
    page, where pyarrow dictionary-encodes them); the footer stays intact."""
    meta = pq.read_metadata(shard)
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    col = meta.row_group(group).column(names.index("latent"))
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    data = bytearray(shard.read_bytes())
    data[start + col.total_compressed_size // 2] ^= 0x10
    shard.write_bytes(bytes(data))


def pairs_argv(setup, out):
    return ["--prompts", setup["prompts"], "--pretrained_model_name_or_path", setup["pipe"], "--output_dir", str(out),
            "--resolution", "16", "--num_inference_steps", "3", "--num_pairs", "8"]


@pytest.fixture
def pairs_copy(train_setup, tmp_path):
    shutil.copytree(train_setup["pairs"], tmp_path / "pairs")
    return tmp_path / "pairs"


def test_a_flipped_latent_byte_in_a_pairs_shard_is_an_error_naming_the_shard(pairs_copy):
    import re

    clean = PairsStore(pairs_copy).latents(range(8))
    flip_a_latent_byte(shard_path(pairs_copy, 0))
    with pytest.raises(PairsError, match=r"shard-00000.parquet: corrupt shard, pair \d \(row group 0\) does not "
                                         "match its digest") as e:
        PairsStore(pairs_copy).batch(range(8), verify=True)
    bad = int(re.search(r"pair (\d)", str(e.value)).group(1))
    store = PairsStore(pairs_copy)
    with pytest.raises(PairsError, match=f"pair {bad} "):
        store.latents([bad])
    others = [r for r in range(8) if r != bad]  # the digests are per row: the other rows are intact, and served
    np.testing.assert_array_equal(store.latents(others).numpy(), clean[others].numpy())


def test_verify_store_names_the_bad_shard_and_row_group(pairs_copy, capsys):
    assert verify_main([str(pairs_copy)]) == 0
    assert "1 shards: 1 verified, 0 bad" in capsys.readouterr().out
    flip_a_latent_byte(shard_path(pairs_copy, 0))
    assert verify_main([str(pairs_copy)]) == 1
    out = capsys.readouterr().out
    assert "BAD" in out and "shard-00000.parquet: corrupt: 1 row(s) do not match their digest: index" in out, out


def test_resume_remakes_a_corrupt_pairs_shard_and_says_so(train_setup, pairs_copy, capsys):
    clean = PairsStore(pairs_copy).latents(range(8))
    flip_a_latent_byte(shard_path(pairs_copy, 0))
    capsys.readouterr()
    generate_pairs.main(pairs_argv(train_setup, pairs_copy))
    out = capsys.readouterr().out
    assert "shard-00000.parquet: corrupt, re-making it: 1 row(s) do not match their digest" in out, out
    assert "8 pairs written" in out and "0 were already there" in out
    np.testing.assert_array_equal(PairsStore(pairs_copy).latents(range(8)).numpy(), clean.numpy())


def test_a_flipped_byte_in_a_latents_shard_is_refused_on_read_and_remade_on_resume(real_latents, tiny_pipe_dir,
                                                                                  tmp_path, capsys):
    store = tmp_path / "real"
    shutil.copytree(real_latents, store)
    clean = LatentStore(store).batch(range(8))[0]
    flip_a_latent_byte(shard_path(store, 0))
    with pytest.raises(LatentsError, match=r"corrupt shard, item \d \(row group 0\)"):
        LatentStore(store).batch(range(8))
    images = tmp_path / "images"  # the fixture's images alone (its folder also holds the store)
    images.mkdir()
    for f in Path(real_latents).parent.glob("img*"):
        shutil.copy(f, images)
    capsys.readouterr()
    encode_images.main(["--images", str(images), "--pretrained_model_name_or_path", tiny_pipe_dir,
                        "--output_dir", str(store), "--resolution", "16"])
    assert "corrupt, re-making it" in capsys.readouterr().out
    np.testing.assert_array_equal(LatentStore(store).batch(range(8))[0].numpy(), clean.numpy())


def test_a_store_written_before_checksums_still_reads_with_a_note(pairs_copy, capsys):
    """An old shard (no digest column) is rewritten here as the code before issue 25 wrote it."""
    p = shard_path(pairs_copy, 0)
    pq.write_table(pq.read_table(p).drop_columns([DIGEST_COLUMN]), p, row_group_size=ROW_GROUP_ROWS)
    store = PairsStore(pairs_copy)
    assert len(store.batch(range(8), verify=True)[1]) == 8
    assert "1 of 1 shards" in store.verification_note() and "cannot be verified" in store.verification_note()
    assert verify_main([str(pairs_copy)]) == 0
    assert "0 verified, 0 bad, 1 unverifiable" in capsys.readouterr().out


def test_new_shards_carry_checksums_and_stay_readable_without_this_package(pairs_copy):
    store = PairsStore(pairs_copy)
    assert store.verification_note() is None
    table = pa.concat_tables([pq.read_table(p) for p in sorted((pairs_copy / "shards").glob("*.parquet"))])
    assert table.num_rows == 8 and set(table.column_names) >= {"index", "prompt", "latent"}
