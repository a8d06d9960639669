"""METEOR 1.5 through pycocoevalcap's own wrapper, one JVM per process.

pycocoevalcap's ``Meteor`` starts ``java -jar meteor-1.5.jar - - -stdio -l en -norm`` in its
constructor and speaks a line protocol with it: one ``SCORE ||| ref ||| ... ||| hyp`` line per
study (the jar answers with a line of statistics), then one ``EVAL ||| stats ||| ...`` line (the jar
answers with one score per study and then the corpus score). The scoring itself is left untouched;
this module only fixes what goes wrong around it in research code:

* **No Java**: ``Popen`` raises deep inside pycocoevalcap. We check ``java`` on ``PATH`` first and
  raise one clear :class:`MeteorUnavailable` line instead.
* **Start-up cost**: the JVM plus the paraphrase table take seconds to load, so one instance is
  kept per process (:func:`get_meteor`), created lazily and closed at exit.
* **Desynchronised protocol**: a newline inside a report splits a request in two and the next
  read blocks for ever; ``|||`` inside a *reference* silently adds references. Text sent to the
  jar therefore has every whitespace run folded into one space and ``|||`` removed. On text that
  is already clean (single spaces, no ``|``) this changes nothing.
* **A dead or stuck JVM**: pycocoevalcap then fails on ``float(b'')`` while holding its lock, so the
  next call (or its own ``__del__``) deadlocks. We release the lock, stop the process, report its
  stderr, and the next :func:`get_meteor` starts a fresh one. A watchdog kills a JVM that answers
  nothing for ``timeout_s`` so a hang becomes an error.
* **fork()**: a child process must not talk to (or kill) its parent's JVM; it gets its own.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import os
import shutil
import subprocess
import threading
from typing import Deque, Mapping, Optional, Sequence

from pycocoevalcap.meteor.meteor import Meteor

from ifnet.errors import IFNetError

SKIP_HINT = ("To score without METEOR: `ifnet score --no-meteor`, or compute_scores(metrics=...) "
             "without \"METEOR\"")
JAVA_HINT = ("METEOR needs Java: install default-jre-headless (or any Java 8+ runtime) so that "
             "`java` is on PATH. " + SKIP_HINT)

#: Seconds allowed for one corpus, on top of ``_TIMEOUT_PER_STUDY_S`` per study. Generous on
#: purpose: it only exists to turn a silent hang into an error, never to fail a slow machine.
_TIMEOUT_BASE_S = 300.0
_TIMEOUT_PER_STUDY_S = 0.5


class MeteorUnavailable(IFNetError):
    """Java is missing, or the METEOR JVM could not be started or stopped responding."""


def find_java() -> str:
    """Path of the ``java`` that pycocoevalcap will run, or :class:`MeteorUnavailable`."""
    java = shutil.which("java")
    if java is None:
        raise MeteorUnavailable(f"no `java` found on PATH. {JAVA_HINT}")
    return java


def meteor_text(text: str) -> str:
    """The form of ``text`` that is safe to put on one line of the METEOR protocol.

    Folds whitespace runs (newlines included) to one space, removes the ``|||`` field separator,
    and replaces unencodable lone surrogates, which would otherwise raise inside pycocoevalcap
    while it holds its lock.
    """
    text = text.encode("utf-8", "replace").decode("utf-8")
    return " ".join(text.replace("|||", " ").split())


class _OwnedMeteor(Meteor):
    """pycocoevalcap's Meteor with a lifecycle that cannot deadlock or kill another process's JVM.

    Scoring (``compute_score``, ``_stat``) is inherited unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        self.owner_pid = os.getpid()

    def close(self) -> None:
        """Stop the JVM. Safe to call twice, after a crash, and from ``__del__``."""
        if getattr(self, "owner_pid", None) != os.getpid() or not hasattr(self, "meteor_p"):
            return  # a fork()ed child must leave its parent's JVM alone
        # After a crash pycocoevalcap leaves its lock held; Lock may be released by any thread.
        if self.lock.locked():
            with contextlib.suppress(RuntimeError):
                self.lock.release()
        proc = self.meteor_p
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.close()
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def __del__(self) -> None:  # replaces Meteor.__del__, which blocks on a lock left held by a crash
        self.close()


class MeteorScorer:
    """One METEOR JVM. Use :func:`get_meteor` rather than constructing this directly.

    ``compute_score(gts, res)`` has pycocoevalcap's signature and result:
    ``(corpus_score, [per_study_score, ...])``.
    """

    def __init__(self, timeout_s: Optional[float] = None) -> None:
        find_java()
        try:
            self._meteor = _OwnedMeteor()
        except OSError as e:
            raise MeteorUnavailable(f"could not start java for METEOR ({e}). {JAVA_HINT}") from None
        self._timeout_s = timeout_s
        self._stderr_tail: Deque[str] = collections.deque(maxlen=20)
        # pycocoevalcap pipes stderr but never reads it: drain it so a chatty JVM cannot block on a
        # full pipe, and keep the last lines to explain a crash.
        self._drain = threading.Thread(target=self._drain_stderr, name="meteor-stderr", daemon=True)
        self._drain.start()

    @property
    def pid(self) -> int:
        """The process that started this JVM (a fork()ed child must start its own)."""
        return self._meteor.owner_pid

    @property
    def alive(self) -> bool:
        return self._meteor.meteor_p.poll() is None

    def _drain_stderr(self) -> None:
        stream = self._meteor.meteor_p.stderr
        with contextlib.suppress(OSError, ValueError):
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    self._stderr_tail.append(line)

    def compute_score(self, gts: Mapping[object, Sequence[str]],
                      res: Mapping[object, Sequence[str]]) -> tuple[float, list[float]]:
        """Corpus METEOR and per-study scores, exactly as pycocoevalcap's ``Meteor.compute_score``.

        ``gts``: {key: [reference, ...]}, ``res``: {key: [hypothesis]}, with the same keys in the
        same order. Text is passed through :func:`meteor_text` first.
        """
        safe_gts = {k: [meteor_text(r) for r in refs] for k, refs in gts.items()}
        safe_res = {k: [meteor_text(h) for h in hyps] for k, hyps in res.items()}
        timeout = self._timeout_s
        if timeout is None:
            timeout = _TIMEOUT_BASE_S + _TIMEOUT_PER_STUDY_S * len(safe_gts)
        timed_out = threading.Event()

        def kill_stuck_jvm() -> None:
            timed_out.set()
            with contextlib.suppress(OSError):
                self._meteor.meteor_p.kill()

        watchdog = threading.Timer(timeout, kill_stuck_jvm)
        watchdog.daemon = True
        watchdog.start()
        try:
            score, scores = self._meteor.compute_score(safe_gts, safe_res)
        except (ValueError, OSError) as e:
            # float(b'') (the JVM closed stdout) or a broken pipe: the JVM is gone or was killed.
            self.close()
            self._drain.join(timeout=5)
            why = f"no answer within {timeout:.0f} s" if timed_out.is_set() else f"{type(e).__name__}: {e}"
            tail = " | ".join(self._stderr_tail) or "no output on stderr"
            raise MeteorUnavailable(f"the METEOR java process failed ({why}); java said: {tail}. "
                                    f"{SKIP_HINT}") from None
        finally:
            watchdog.cancel()
        return float(score), [float(s) for s in scores]

    def close(self) -> None:
        self._meteor.close()


_instance: Optional[MeteorScorer] = None
_instance_lock = threading.Lock()


def get_meteor() -> MeteorScorer:
    """The process's METEOR scorer, started on first use and restarted if its JVM died."""
    global _instance
    with _instance_lock:
        if _instance is None or _instance.pid != os.getpid() or not _instance.alive:
            if _instance is not None and _instance.pid == os.getpid():
                _instance.close()
            _instance = MeteorScorer()
        return _instance


def close_meteor() -> None:
    """Stop this process's METEOR JVM (registered with ``atexit``; safe to call any time)."""
    global _instance
    with _instance_lock:
        if _instance is not None:
            _instance.close()
            _instance = None


atexit.register(close_meteor)
