"""The run log (core/metrics.py setup_logging): what the project's modules log reaches train.log on rank 0, once on
the terminal."""
import io
import logging
import sys

from core.metrics import setup_logging


def _close(*names):
    for name in names:
        for h in list(logging.getLogger(name).handlers):
            h.close()
            logging.getLogger(name).removeHandler(h)


def test_module_loggers_reach_the_run_log_once(tmp_path, capsys, monkeypatch):
    """Was: data.store / data.loader warnings went to stderr only (the last-resort handler), never to train.log, and
    their INFO lines (index built, regularisation counts) nowhere."""
    try:
        for is_main in (True, True):  # a second run in one process: still one line each, not two
            log = setup_logging(str(tmp_path / "logs"), is_main)
        log.info("from the run")
        logging.getLogger("data.store").warning("skipped img1 at load time: damaged")
        logging.getLogger("training.resume").info("a state note")
        logging.getLogger("data.index").debug("not at INFO")
        logging.getLogger("PIL.PngImagePlugin").warning("not ours")  # other libraries' loggers are left alone
        text = (tmp_path / "logs" / "train.log").read_text()
        err = capsys.readouterr().err
        for line in ("from the run", "WARNING skipped img1 at load time: damaged", "INFO a state note"):
            assert text.count(line) == 1 and err.count(line) == 1, (line, text, err)
        assert "not at INFO" not in text + err and "not ours" not in text
        now = io.StringIO()  # the console writes to stderr as it is now (a later cache.main's records: the stream
        monkeypatch.setattr(sys, "stderr", now)  # captured at the run's start may be closed by then)
        logging.getLogger("data.store").warning("after the run")
        assert "after the run" in now.getvalue()
        monkeypatch.undo()
        setup_logging(None, False)  # another rank: warnings only, on the terminal
        logging.getLogger("data.loader").info("rank 1 info")
        logging.getLogger("data.loader").warning("rank 1 warning")
        err = capsys.readouterr().err
        assert "rank 1 info" not in err and err.count("rank 1 warning") == 1, err
    finally:
        _close("sdtrain", "core", "data", "diffusion", "models", "networks", "tools", "training")
        for name in ("core", "data", "diffusion", "models", "networks", "tools", "training"):
            logging.getLogger(name).setLevel(logging.NOTSET)
