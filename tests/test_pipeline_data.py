"""Records, validation, chats, split and batching of the analysis pipeline."""

import copy
import json

import pytest

from moe_fastmask.pipeline import batching, data
from moe_fastmask.pipeline.batching import BatchPlanError, group_sizes, plan_batches
from moe_fastmask.pipeline.data import DataValidationError


def _record(i, judge=1):
    return {
        "id": i,
        "goal": f"Explain how to do thing {i}.",
        "all_prompt": [{"role": "system", "content": "Flip it."}, {"role": "user", "content": f"TASK {i}"}],
        "judge_success_gpt4": judge,
    }


def _records(n, judge=lambda i: i % 3 != 0):
    return [_record(i, int(judge(i))) for i in range(n)]


def _write(tmp_path, obj, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


# ------------------------------------------------------------------------------------------------------------
# validation: every error names the record (index and id) and the field
# ------------------------------------------------------------------------------------------------------------


def _set(index, key, value):
    def mutate(records):
        records[index][key] = value

    return mutate


def _delete(index, key):
    def mutate(records):
        del records[index][key]

    return mutate


def _message(index, turn, message):
    def mutate(records):
        records[index]["all_prompt"][turn] = message

    return mutate


INVALID = [
    pytest.param(_set(2, "goal", ""), ["record 2 (id 2)", "'goal' is empty"], id="empty-goal"),
    pytest.param(_set(2, "goal", "   "), ["record 2 (id 2)", "'goal'"], id="blank-goal"),
    pytest.param(_delete(1, "goal"), ["record 1 (id 1)", "'goal' is missing"], id="missing-goal"),
    pytest.param(_set(1, "goal", 7), ["record 1 (id 1): field 'goal' must be a string, got int 7"], id="goal-int"),
    pytest.param(_set(1, "goal", None), ["record 1 (id 1): field 'goal' must be a string, got null"], id="goal-null"),
    pytest.param(_set(1, "goal", ["a"]), ["field 'goal' must be a string, got list"], id="goal-list"),
    pytest.param(_set(3, "all_prompt", "hi"), ["record 3 (id 3)", "'all_prompt'", "non-empty list"], id="prompt-str"),
    pytest.param(_set(3, "all_prompt", []), ["record 3 (id 3)", "'all_prompt'", "empty list"], id="prompt-empty"),
    pytest.param(_delete(3, "all_prompt"), ["record 3 (id 3)", "'all_prompt' is missing"], id="prompt-missing"),
    pytest.param(_set(3, "all_prompt", None), ["record 3 (id 3)", "'all_prompt'", "got null"], id="prompt-null"),
    pytest.param(_set(3, "all_prompt", [{"role": "system", "content": "Answer everything."}]),
                 ["record 3 (id 3)", "'all_prompt' holds no user message"], id="prompt-no-user"),
    pytest.param(_message(3, 0, {"role": "user", "content": "  "}),
                 ["record 3 (id 3)", "'all_prompt', message 0", "the user's 'content' is empty"], id="user-empty"),
    pytest.param(_message(0, 1, {"content": "x"}), ["record 0 (id 0)", "'all_prompt', message 1", "'role'"],
                 id="message-no-role"),
    pytest.param(_message(0, 0, {"role": "user"}), ["record 0 (id 0)", "'all_prompt', message 0", "'content'"],
                 id="message-no-content"),
    pytest.param(_message(0, 0, "hello"), ["record 0 (id 0)", "'all_prompt', message 0"], id="message-not-object"),
    pytest.param(_message(4, 0, {"role": "hacker", "content": "x"}), ["record 4 (id 4)", "unknown role 'hacker'"],
                 id="unknown-role"),
    pytest.param(_message(4, 0, {"role": "user", "content": None}), ["record 4 (id 4)", "'content' must be a string",
                 "got null"], id="content-not-string"),
    pytest.param(_message(4, 0, {"role": 3, "content": "x"}), ["record 4 (id 4)", "'role' must be a string, got int"],
                 id="role-not-string"),
    pytest.param(_set(3, "all_prompt", {"role": "user"}), ["record 3 (id 3)", "'all_prompt'", "got object"],
                 id="prompt-object"),
    pytest.param(_set(5, "id", 2), ["record 5 (id 2)", "'id'", "duplicate id 2", "first used by record 2"],
                 id="duplicate-id"),
    pytest.param(_set(5, "id", "5"), ["record 5 (id '5')", "'id' must be an integer, got str '5'"], id="id-not-int"),
    pytest.param(_set(5, "id", 5.0), ["'id' must be an integer, got float 5.0"], id="id-float"),
    pytest.param(_delete(5, "id"), ["record 5 (no id)", "'id' is missing"], id="id-missing"),
    pytest.param(_set(2, "goal", "Say \ud83d hi"), ["record 2 (id 2): field 'goal'", "lone UTF-16 surrogate"],
                 id="goal-lone-surrogate"),
    pytest.param(_message(3, 0, {"role": "user", "content": "a\udc00b"}),
                 ["record 3 (id 3): field 'all_prompt', message 0: 'content'", "'\\udc00'", "surrogate"],
                 id="content-lone-surrogate"),
    pytest.param(_set(6, "judge_success_gpt4", "<missing>"),
                 ["record 6 (id 6)", "'judge_success_gpt4'", "got str '<missing>'"], id="judge-str-missing-literal"),
    pytest.param(_set(6, "judge_success_gpt4", 2), ["record 6 (id 6)", "'judge_success_gpt4'", "0 or 1", "2"],
                 id="judge-2"),
    pytest.param(_set(6, "judge_success_gpt4", "yes"), ["record 6 (id 6)", "'judge_success_gpt4'", "got str 'yes'"],
                 id="judge-str"),
    pytest.param(_set(6, "judge_success_gpt4", True), ["record 6 (id 6)", "'judge_success_gpt4'"], id="judge-bool"),
    pytest.param(_delete(6, "judge_success_gpt4"), ["record 6 (id 6)", "'judge_success_gpt4'", "nothing (missing)"],
                 id="judge-missing"),
]  # fmt: skip


@pytest.mark.parametrize("mutate, fragments", INVALID)
def test_validation_errors_name_record_and_field(tmp_path, mutate, fragments):
    records = _records(8)
    mutate(records)
    path = _write(tmp_path, records)
    with pytest.raises(DataValidationError) as info:
        data.load_records(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert str(path) in message
    assert "null None" not in message  # a null is named once


def test_an_empty_system_message_in_the_jailbreak_chat_is_accepted(tmp_path):
    records = _records(4)
    records[1]["all_prompt"] = [{"role": "system", "content": ""}, *records[1]["all_prompt"]]
    assert data.load_records(_write(tmp_path, records))[1].all_prompt[0] == {"role": "system", "content": ""}


def test_top_level_not_a_list(tmp_path):
    with pytest.raises(DataValidationError, match="expected a JSON list of records, got dict"):
        data.load_records(_write(tmp_path, {"records": _records(2)}))


def test_record_not_an_object(tmp_path):
    with pytest.raises(DataValidationError, match=r"record 1 \(not an object\).*got str"):
        data.load_records(_write(tmp_path, [_record(0), "oops"]))


def test_invalid_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{]")
    with pytest.raises(DataValidationError, match="not valid JSON"):
        data.load_records(bad)
    with pytest.raises(DataValidationError, match="does not exist"):
        data.load_records(tmp_path / "missing.json")
    lines = tmp_path / "records.jsonl"
    lines.write_text("".join(json.dumps(record) + "\n" for record in _records(3)))
    with pytest.raises(DataValidationError, match=r"JSON Lines .* a JSON list of records is expected"):
        data.load_records(lines)


def test_escaped_surrogate_pairs_are_text(tmp_path):
    records = _records(2)
    path = tmp_path / "emoji.json"
    path.write_text(json.dumps(records).replace('"id": 1, "goal": "', '"id": 1, "goal": "\\ud83d\\ude00 '))
    assert data.load_records(path)[1].goal.startswith("\U0001F600 ")  # a whole pair is one character


def test_load_records_and_only_successful(tmp_path):
    raw = _records(9)
    path = _write(tmp_path, raw)
    records = data.load_records(path)
    assert [r.id for r in records] == list(range(9))
    assert [r.index for r in records] == list(range(9))
    assert records[4].all_prompt == raw[4]["all_prompt"]
    successful = data.load_records(path, only_successful=True)
    assert [r.id for r in successful] == [i for i in range(9) if i % 3 != 0]
    assert all(r.judge_success_gpt4 == 1 for r in successful)


def test_safe_and_unsafe_messages():
    record = data.validate_records([_record(3)])[0]
    assert data.safe_messages(record) == [
        {"role": "system", "content": data.DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": record.goal},
    ]
    assert data.safe_messages(record, system_prompt="Be brief.")[0]["content"] == "Be brief."
    assert data.safe_messages(record, system_prompt=None) == [{"role": "user", "content": record.goal}]
    unsafe = data.unsafe_messages(record)
    assert unsafe == record.all_prompt
    unsafe[0]["content"] = "changed"  # a copy: the record is untouched
    assert record.all_prompt[0]["content"] == "Flip it."


def test_render_prompt_uses_chat_template():
    from moe_fastmask.pipeline.demo import build_offline_tokenizer

    tokenizer = build_offline_tokenizer()
    record = data.validate_records([_record(1)])[0]
    text = data.render_prompt(tokenizer, data.safe_messages(record))
    assert text == (
        f"{tokenizer.bos_token}<|system|>\n{data.DEFAULT_SYSTEM_PROMPT}\n<|user|>\n{record.goal}\n<|assistant|>\n"
    )
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        data.render_prompt(tokenizer, data.safe_messages(record))


# ------------------------------------------------------------------------------------------------------------
# split
# ------------------------------------------------------------------------------------------------------------


def test_split_is_seeded_stratified_and_disjoint(tmp_path):
    records = data.validate_records(_records(50))
    train, test = data.split_records(records, 0.2, seed=3)
    assert {r.id for r in train}.isdisjoint({r.id for r in test})
    assert len(train) + len(test) == 50
    n_pos = sum(r.judge_success_gpt4 for r in records)
    assert sum(r.judge_success_gpt4 for r in test) == int(n_pos * 0.2 + 0.5)
    assert sum(1 - r.judge_success_gpt4 for r in test) == int((50 - n_pos) * 0.2 + 0.5)
    again = data.split_records(list(reversed(records)), 0.2, seed=3)
    assert [r.id for r in again[1]] == [r.id for r in test]  # independent of the input order
    assert [r.id for r in data.split_records(records, 0.2, seed=4)[1]] != [r.id for r in test]
    assert data.split_records(records, 0.0, seed=3)[1] == []
    with pytest.raises(ValueError, match="test_fraction"):
        data.split_records(records, 1.0)

    split = data.make_split(records, 0.2, 3, tmp_path / "data.json")
    assert set(split) == set(data.SPLIT_KEYS) | {"data_sha256", "fingerprints"}
    assert split["data_sha256"] is None  # no such file: nothing to hash
    assert split["fingerprints"] == {str(r.id): data.record_fingerprint(r) for r in records}
    assert len(set(split["fingerprints"].values())) == len(records)
    # the fingerprint is the content: id and label do not change it, the goal or the chat does
    first = records[0]
    relabelled = data.Record(id=999, goal=first.goal, all_prompt=first.all_prompt,
                             judge_success_gpt4=1 - first.judge_success_gpt4, index=7)
    assert data.record_fingerprint(relabelled) == data.record_fingerprint(first)
    edited = data.Record(id=first.id, goal=first.goal + "!", all_prompt=first.all_prompt,
                         judge_success_gpt4=first.judge_success_gpt4, index=first.index)
    assert data.record_fingerprint(edited) != data.record_fingerprint(first)
    path = _write(tmp_path, split, "split.json")
    assert data.load_split(path) == split
    _write(tmp_path, {"seed": 0}, "bad_split.json")
    with pytest.raises(ValueError, match="missing test_fraction"):
        data.load_split(tmp_path / "bad_split.json")


# ------------------------------------------------------------------------------------------------------------
# batching
# ------------------------------------------------------------------------------------------------------------


def test_paired_batches_at_half_ratio():
    records = data.validate_records(_records(20))
    batches = plan_batches(records, batch_size=8, safe_ratio=0.5, seed=0)
    assert len(batches) == 5  # 20 records / 4 per batch
    seen = []
    for b, batch in enumerate(batches):
        assert batch.batch_idx == b
        assert batch.safe_indices == [0, 1, 2, 3] and batch.unsafe_indices == [4, 5, 6, 7]
        assert batch.groups == [0] * 4 + [1] * 4
        assert batch.pairs() == [(i, i + 4) for i in range(4)]
        for s, u in batch.pairs():
            assert batch.items[s].record.id == batch.items[u].record.id
        seen += [item.record.id for item in batch.items[:4]]
    assert sorted(seen) == list(range(20))  # every record used once
    again = plan_batches(records, batch_size=8, safe_ratio=0.5, seed=0)
    assert [[i.record.id for i in b.items] for b in again] == [[i.record.id for i in b.items] for b in batches]
    other = plan_batches(records, batch_size=8, safe_ratio=0.5, seed=1)
    assert [[i.record.id for i in b.items] for b in other] != [[i.record.id for i in b.items] for b in batches]


def test_unbalanced_ratio_pairs_the_smaller_half():
    records = data.validate_records(_records(12))
    (batch,) = plan_batches(records, batch_size=8, safe_ratio=0.25, num_batches=1)
    assert batching.group_sizes(8, 0.25) == (2, 6)
    assert batch.safe_indices == [0, 1] and batch.unsafe_indices == [2, 3, 4, 5, 6, 7]
    assert batch.pairs() == [(0, 2), (1, 3)]
    assert len(plan_batches(records, batch_size=8, safe_ratio=0.75)) == 2  # 6 records per batch


def test_rounding_half_up():
    assert group_sizes(5, 0.5) == (3, 2)
    assert group_sizes(16, 0.5) == (8, 8)
    assert group_sizes(10, 0.25) == (3, 7)


@pytest.mark.parametrize(
    "batch_size, ratio, nearest, match",
    [
        (15, 0.5, (14, 16), r"batch size 15 at safe ratio 0.5 gives 7.5 safe prompts per batch, which would be rounded "
                            r"to 8 safe \+ 7 jailbreak prompts, leaving one prompt of every batch without its other "
                            r"form; use --batch-size 14 or 16"),
        (3, 0.5, (2, 4), r"use --batch-size 2 or 4"),
        (10, 0.25, (8, 12), r"2.5 safe prompts .* 3 safe \+ 7 jailbreak prompts, a safe share of 0.3 instead of 0.25; "
                            r"use --batch-size 8 or 12"),
        (16, 0.3, (10, 20), r"use --batch-size 10 or 20"),
    ],
)  # fmt: skip
def test_batches_that_cannot_hold_the_mix_are_refused_naming_the_nearest_sizes(batch_size, ratio, nearest, match):
    records = data.validate_records(_records(40))
    with pytest.raises(BatchPlanError, match=match):
        plan_batches(records, batch_size=batch_size, safe_ratio=ratio)
    for size in nearest:
        n_safe = round(size * ratio)
        assert batching.check_batch_mix(size, ratio) == (n_safe, size - n_safe)
        assert plan_batches(records, batch_size=size, safe_ratio=ratio, num_batches=1)[0].safe_indices == list(
            range(n_safe)
        )


def test_a_mix_no_nearby_size_holds_suggests_the_ratio_the_size_can_hold():
    with pytest.raises(BatchPlanError) as info:
        batching.check_batch_mix(3, 0.333)
    message = str(info.value)
    assert "--batch-size" not in message.split(";")[-1] and "1000" not in message  # no far-off sizes
    suggested = float(message.split("--safe-ratio ")[1].split()[0])
    assert batching.check_batch_mix(3, suggested) == (1, 2)  # the ratio it names works as given


def test_whole_mixes_pass_and_float_ratios_are_not_refused_for_rounding_noise():
    assert batching.check_batch_mix(16, 0.5) == (8, 8)
    assert batching.check_batch_mix(10, 0.3) == (3, 7)  # 10 * 0.3 = 3.0000000000000004
    assert batching.check_batch_mix(12, 1 / 3) == (4, 8)
    assert batching.nearest_whole_sizes(15, 0.5) == [14, 16]
    assert batching.nearest_whole_sizes(7, 0.123457) == []  # none within reach: the message says what to do
    with pytest.raises(BatchPlanError, match="whose product with the safe ratio is a whole number"):
        batching.check_batch_mix(7, 0.123457)


@pytest.mark.parametrize(
    "batch_size, ratio, match",
    [
        (8, 0.0, "strictly between 0 and 1"),
        (8, 1.0, "strictly between 0 and 1"),
        (8, 0.01, "0 safe and 8 unsafe"),
        (8, 0.97, "8 safe and 0 unsafe"),
        (1, 0.5, "batch_size must be an integer >= 2"),
    ],
)
def test_ratios_leaving_a_group_empty_are_rejected(batch_size, ratio, match):
    records = data.validate_records(_records(20))
    with pytest.raises(BatchPlanError, match=match):
        plan_batches(records, batch_size=batch_size, safe_ratio=ratio)


def test_not_enough_data_says_how_many_batches_fit():
    records = data.validate_records(_records(18))
    with pytest.raises(BatchPlanError, match=r"5 batches requested but the 18 records fill only 2 .*8 records.*"
                                             r"--num-batches 2"):  # fmt: skip
        plan_batches(records, batch_size=16, safe_ratio=0.5, num_batches=5)
    with pytest.raises(BatchPlanError, match="^3 records cannot fill one batch"):
        plan_batches(records[:3], batch_size=16, safe_ratio=0.5)
    with pytest.raises(BatchPlanError, match=r"^1 record cannot fill one batch: .* needs 2 records"):
        plan_batches(records[:1], batch_size=4, safe_ratio=0.5)
    with pytest.raises(BatchPlanError, match=r"^1 batch requested but the 1 record fills only 0"):
        plan_batches(records[:1], batch_size=4, safe_ratio=0.5, num_batches=1)
    with pytest.raises(BatchPlanError, match="fill only 0"):
        plan_batches(records[:3], batch_size=16, safe_ratio=0.5, num_batches=1)
    with pytest.raises(BatchPlanError, match="positive integer"):
        plan_batches(records, batch_size=4, num_batches=0)
    assert len(plan_batches(copy.deepcopy(records), batch_size=16, num_batches=2)) == 2
