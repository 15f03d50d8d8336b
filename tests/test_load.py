"""A smaller load run in CI: concurrent sessions each get their own answers, none lost or crossed."""

from loadtest import free_port, run, stop_frees_the_slot

from metis.ui import build_demo


def test_concurrent_sessions_get_their_own_answers(engine, stream_log):
    demo = build_demo(engine)
    demo.queue(default_concurrency_limit=engine.concurrency)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        report = run(demo.local_url, engine, sessions=4, turns=2)
        stop = stop_frees_the_slot(demo.local_url, engine)
    finally:
        demo.close()
    assert report["failed"] == 0, report["errors"]
    assert report["completed"] == 8 and report["wrong_or_crossed"] == 0, report["mismatches"]
    # Stop in one session ends only that one: its stream is closed long before its 16k tokens
    # (the only stream not run to its end), and the queued session gets its own, complete answer.
    assert stop["stopped_while_generating"] and stop["other_session_answer_ok"], stop
    (stopped,) = [call for call in stream_log.calls if not call.finished]
    assert len(stopped.events) < 16384
