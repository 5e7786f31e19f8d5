"""Incremental detokenization and stop strings, on the default model's real tokenizer."""

import pytest

from server.engine.detokenizer import IncrementalDetokenizer, StopChecker

TEXTS = {
    "chinese": "北京是中华人民共和国的首都。",
    "japanese": "東京は日本の首都です。こんにちは！",
    "thai": "กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย",
    "arabic": "القاهرة هي عاصمة مصر.",
    "hebrew": "ירושלים היא עיר הבירה.",
    "emoji": "Good luck 🍀🚀👩‍🔬 and 🇫🇷!",
}


def run(tokenizer, prompt_ids, ids):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detok.add(i) for i in ids]
    return deltas + [detok.flush()]


@pytest.mark.parametrize("name", TEXTS)
def test_no_broken_characters(tokenizer, name):
    text = TEXTS[name]
    prompt = tokenizer("Say it:", add_special_tokens=False)["input_ids"]
    ids = tokenizer(" " + text, add_special_tokens=False)["input_ids"]
    # the test is only worth something if some single tokens are partial characters
    if name != "hebrew":
        assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "no token splits a character"
    deltas = run(tokenizer, prompt, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == " " + text


def test_prompt_ending_mid_character_does_not_leak(tokenizer):
    ids = tokenizer("你好世界🙂再见", add_special_tokens=False)["input_ids"]
    splits = [k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd")]
    assert splits, "no split point inside a character"
    for k in splits:
        prompt_text = tokenizer.decode(ids[:k])
        deltas = run(tokenizer, ids[:k], ids[k:])
        joined = "".join(deltas)
        assert not any("\ufffd" in d for d in deltas)
        assert joined == tokenizer.decode(ids)[len(prompt_text):]


def test_leading_space_kept(tokenizer):
    prompt = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    ids = tokenizer(" big world", add_special_tokens=False)["input_ids"]
    assert "".join(run(tokenizer, prompt, ids)) == " big world"


def test_unfinished_character_is_flushed(tokenizer):
    ids = tokenizer("🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    deltas = run(tokenizer, tokenizer("a")["input_ids"], ids[:-1])
    assert deltas[:-1] == [""] * (len(ids) - 1)  # held back while incomplete
    assert deltas[-1].endswith("\ufffd")  # the model produced invalid bytes: they come out at the end


def feed_all(stops, pieces):
    s = StopChecker(stops)
    out, stopped = [], False
    for p in pieces:
        text, stopped = s.feed(p)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(s.flush())
    return out, stopped


def test_stop_across_boundaries():
    out, stopped = feed_all(("o w",), ["Hel", "lo", " wo", "rld"])
    assert stopped and "".join(out) == "Hell"


def test_stop_held_back_until_decided():
    s = StopChecker(("END",))
    assert s.feed("abc E") == ("abc ", False)  # "E" could start "END"
    assert s.feed("N") == ("", False)
    assert s.feed("X") == ("ENX", False)  # it did not
    assert s.flush() == ""


def test_earliest_stop_wins_and_no_stop_passes_everything():
    out, stopped = feed_all(("cd", "b"), ["abcdef"])
    assert stopped and "".join(out) == "a"
    out, stopped = feed_all((), ["a", "b"])
    assert not stopped and out == ["a", "b", ""]
    out, stopped = feed_all(("zz",), ["ab", "cz"])
    assert not stopped and "".join(out) == "abcz"
