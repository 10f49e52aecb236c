"""Policy + tool inference for evaluation: verl's prompt, batched greedy answers, masks, records, resume."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from verl_grto.data.masks import encode_rle
from verl_grto.data.parquet import write_rows_atomic
from verl_grto.data.schema import GroundTruth, RLRow, build_instruction
from verl_grto.data.synthetic import write_synthetic
from verl_grto.eval.evaluate import prediction_path, read_prediction, run_predictions
from verl_grto.eval.inference import (
    PolicyToolPredictor,
    PromptedToolPredictor,
    SampleRecord,
    _Recorder,
    read_records,
    row_rgb,
    summarize_records,
)
from verl_grto.policy.inputs import build_messages, model_inputs, render_prompt, row_images
from verl_grto.reward.answer import ToolPrompt, format_answer, parse_answer

#: Not a multiple of Qwen2.5-VL's 28-pixel patch grid, and not square: qwen_vl_utils resizes it, and
#: a transposed (W, H) anywhere shows up as a wrong mask shape.
ODD_HW = (90, 150)


def _odd_row(index: int) -> dict:
    h, w = ODD_HW
    rgb = np.random.default_rng(7).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    gt = np.zeros(ODD_HW, bool)
    gt[20:60, 30:100] = True
    return RLRow(
        data_source="t",
        instruction=build_instruction("the wide grey rectangle", w, h),
        image_png=buf.getvalue(),
        ground_truth=GroundTruth(encode_rle(gt), [[30.0, 20.0, 100.0, 60.0]], ODD_HW),
        index=index,
        sample_id="odd",
        split="val",
        expression="the wide grey rectangle",
    ).to_record()


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """Two synthetic 112x112 val rows and one 90x150 row, in one parquet."""
    root = tmp_path_factory.mktemp("split")
    synthetic = pq.read_table(
        write_synthetic(root / "syn", n_train=1, n_val=2, seed=0, domain="plain")["val"]
    ).to_pylist()
    rows = [
        {**r, "extra_info": {k: r["extra_info"][k] for k in ("index", "sample_id", "split", "expression")}}
        for r in synthetic
    ] + [_odd_row(2)]  # one extra_info schema for all rows
    return write_rows_atomic(rows, root / "val.parquet")


@pytest.fixture(scope="module")
def rows(split):
    return pq.read_table(split).to_pylist()


@pytest.fixture(scope="module")
def predictor(tiny_assets):
    return PolicyToolPredictor(tiny_assets.policy, tiny_assets.tool, max_new_tokens=8, device="cpu")


def test_prompt_ids_match_verl_agent_loop(rows, tiny_assets, tmp_path, monkeypatch, split):
    """The token ids verl's dataset + agent loop (Continuous Token builder) send to the rollout, odd sizes included."""
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", tmp_path / "hf_datasets")  # not ~/.cache
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset
    from verl.utils.tokenizer import hf_processor, hf_tokenizer
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    tokenizer, processor = hf_tokenizer(str(tiny_assets.policy)), hf_processor(str(tiny_assets.policy))
    config = OmegaConf.create(
        {"max_prompt_length": 1024, "filter_overlong_prompts": False, "cache_dir": str(tmp_path / "verl_cache")}
    )
    dataset = RLHFDataset(str(split), tokenizer, config, processor=processor)
    builder = create_continuous_token_builder(tokenizer, hf_model_type="qwen2_5_vl", processor=processor)
    for i, row in enumerate(rows):
        messages = dataset[i]["raw_prompt"]
        images, _, _ = RLHFDataset._process_multi_modal_info(messages, processor.image_processor.patch_size, config)
        expected = builder.build_initial_tokens(messages, images=images)
        ids, ours = render_prompt(build_messages(row["prompt"], row_images(row)), processor)
        assert ids == list(expected), row["extra_info"]["sample_id"]
        assert [im.size for im in ours] == [im.size for im in images]
    assert rows[2]["prompt"][0]["content"].startswith("<image>")  # the row itself is left untouched


def test_model_inputs_equal_the_processor_and_left_pad(rows, predictor):
    processor = predictor.policy.processor
    image_token = predictor.policy.model.config.image_token_id
    prompts = [render_prompt(build_messages(r["prompt"], row_images(r)), processor) for r in rows]
    ids, images = prompts[2]
    text = processor.apply_chat_template(
        build_messages(rows[2]["prompt"], row_images(rows[2])), add_generation_prompt=True, tokenize=False
    )
    reference = processor(text=[text], images=images, return_tensors="pt")
    single = model_inputs([ids], [images], processor, image_token_id=image_token, pad_token_id=0)
    assert set(single) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"}
    for key, value in single.items():
        assert torch.equal(value, reference[key].to(value.dtype)), key

    batch = model_inputs(
        [p[0] for p in prompts], [p[1] for p in prompts], processor, image_token_id=image_token, pad_token_id=0
    )
    lengths = [len(p[0]) for p in prompts]
    assert len(set(lengths)) > 1  # the odd-size image makes a longer prompt: padding is exercised
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [0] * (max(lengths) - n) + [1] * n
        assert batch["input_ids"][row, -n:].tolist() == prompts[row][0]
    with pytest.raises(ValueError, match="image tokens"):
        model_inputs([ids], [images + images], processor, image_token_id=image_token)


def test_batched_greedy_answers_match_one_by_one(rows, predictor):
    one_by_one = [predictor.policy.answer([row], 8)[0] for row in rows]
    assert predictor.policy.answer(rows, 8) == one_by_one


def test_mask_has_image_size_and_unparseable_answer_is_recorded(rows, predictor):
    before = len(predictor.records)
    mask = predictor(rows[2])
    assert mask.shape == ODD_HW and mask.dtype == bool
    record = predictor.records[-1]
    assert len(predictor.records) == before + 1 and record.sample_id == "odd"
    assert isinstance(record.answer, str) and record.generation_s > 0 and record.batch_size == 1
    assert record.reason == parse_answer(record.answer, ODD_HW).reason
    assert record.reason  # the random tiny policy does not answer in format
    assert not mask.any() and record.num_objects == 0


def test_parsed_objects_are_segmented_together(rows, predictor, monkeypatch):
    objects = [ToolPrompt((30, 20, 100, 60)), ToolPrompt(None, ((10.0, 80.0),), (1,))]
    answers = {
        "odd": format_answer(objects),
        rows[0]["extra_info"]["sample_id"]: '<answer>{"bbox": [0, 0, 500, 9]}</answer>',
    }
    monkeypatch.setattr(
        predictor.policy, "answer", lambda batch, n: [answers[r["extra_info"]["sample_id"]] for r in batch]
    )
    masks = predictor.predict_batch([rows[2], rows[0]])
    good, bad = predictor.records[-2:]

    expected, used, _ = predictor.segmenter.segment([row_rgb(rows[2])], [objects])
    assert np.array_equal(masks[0], expected[0]) and good.reason == "" and good.num_objects == used[0] == 2
    assert good.tool_s > 0 and good.batch_size == 2
    assert masks[1].shape == (112, 112) and not masks[1].any()
    assert "outside" in bad.reason and bad.num_objects == 0


def test_prompted_tool_predictor_bypasses_the_policy(rows, predictor):
    segmenter = predictor.segmenter
    box = ToolPrompt((30, 20, 100, 60))
    prompted = PromptedToolPredictor(segmenter, [box])
    mask = prompted(rows[2])
    assert np.array_equal(mask, segmenter.segment([row_rgb(rows[2])], [[box]])[0][0])
    assert prompted.records[-1].answer is None and prompted.records[-1].num_objects == 1
    empty, used, _ = segmenter.segment([row_rgb(rows[2])], [[]])
    assert empty[0].shape == ODD_HW and not empty[0].any() and used == [0]
    with pytest.raises(ValueError, match="at least one"):
        PromptedToolPredictor(segmenter, [])


def test_resume_predicts_only_missing_samples(split, rows, predictor, monkeypatch, tmp_path):
    asked: list[str] = []

    def answer(batch, n):
        asked.extend(r["extra_info"]["sample_id"] for r in batch)
        return ["no answer"] * len(batch)

    monkeypatch.setattr(predictor.policy, "answer", answer)
    out = tmp_path / "preds"
    assert run_predictions(split, predictor, out, progress=False, batch_size=2, limit=1) == 1
    first = rows[0]["extra_info"]["sample_id"]
    assert asked == [first]
    kept = np.ones((112, 112), bool)
    Image.fromarray(kept.astype(np.uint8) * 255).save(prediction_path(out, first))  # must not be overwritten

    assert run_predictions(split, predictor, out, progress=False, batch_size=2) == 2
    assert asked == [first, rows[1]["extra_info"]["sample_id"], "odd"]
    assert read_prediction(prediction_path(out, first), (112, 112))[0].all()
    assert read_prediction(prediction_path(out, "odd"), ODD_HW)[1] is None


def test_summary_counts_the_last_record_of_each_sample_of_the_split(tmp_path):
    def rec(sid, reason, answer="x"):
        return SampleRecord(sid, answer, reason, 0 if reason else 1, [], 2.0, 0.5)

    path = tmp_path / "records.jsonl"
    recorder = _Recorder(path)  # appends, as an interrupted then resumed run does
    recorder.add([rec("a", "cut short"), rec("b", "no <answer> tag")])
    _Recorder(path).add([rec("a", ""), rec("c", "no <answer> tag"), rec("z", "")])
    records = read_records(path)
    assert records["a"].reason == "" and len(records) == 4
    summary = summarize_records(records, ["a", "b", "c", "d"])
    assert summary["n"] == 3 and summary["without_record"] == 1 and summary["answered"] == 3
    assert summary["parsed"] == 1 and summary["parse_rate"] == pytest.approx(1 / 3)
    assert summary["reasons"] == {"no <answer> tag": 2} and summary["empty_prompt"] == 2
    assert summary["generation_s_per_sample"] == 2.0 and summary["tool_s_per_sample"] == 0.5
    assert summarize_records({}, ["a"])["parse_rate"] is None
