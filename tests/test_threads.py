"""One Llama shared by threads and by open streams: every caller gets the text it would get alone."""

import threading

import pytest

PROMPTS = ["Once upon a time", "Lily saw a", "The cat", "Tom and Sue", "One day, a big", "The sun was",
           "A little bird", "Mom said"]


def test_eight_threads_get_the_text_of_a_lone_call(stories):
    alone = {p: stories.text_completion([p], max_gen_len=24, temperature=0)[0]["generation"] for p in PROMPTS}
    got, errors = {p: [] for p in PROMPTS}, []

    def worker(prompt):
        try:
            for _ in range(20):
                got[prompt].append(stories.text_completion([prompt], max_gen_len=24, temperature=0)[0]["generation"])
        except Exception as e:  # reported below, with the thread's prompt
            errors.append((prompt, e))

    threads = [threading.Thread(target=worker, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    for p in PROMPTS:
        assert got[p] == [alone[p]] * 20, p


def test_second_call_in_the_thread_of_an_open_stream_is_refused_and_the_stream_resumes(stories):
    alone = stories.text_completion(["Once upon a time"], max_gen_len=40, temperature=0)[0]["generation"]
    stream = stories.stream_text_completion("Once upon a time", max_gen_len=40, temperature=0)
    first = next(stream)
    with pytest.raises(RuntimeError, match="still open.*close"):
        stories.text_completion(["Lily saw a"], max_gen_len=5, temperature=0)
    assert first + "".join(stream) == alone  # the refused call touched nothing


def test_abandoned_stream_never_poisons_the_next_call(stories):
    alone = stories.text_completion(["Lily saw a"], max_gen_len=30, temperature=0)[0]["generation"]
    stream = stories.stream_text_completion("Once upon a time", max_gen_len=40, temperature=0)
    next(stream)
    stream.close()
    assert stories.text_completion(["Lily saw a"], max_gen_len=30, temperature=0)[0]["generation"] == alone
    stream = stories.stream_text_completion("Once upon a time", max_gen_len=40, temperature=0)
    next(stream)
    del stream  # garbage collection closes it
    assert stories.text_completion(["Lily saw a"], max_gen_len=30, temperature=0)[0]["generation"] == alone
