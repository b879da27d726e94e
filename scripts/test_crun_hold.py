"""The node's runtime hold wrapper (deploy/node/crun-hold) against a stand-in crun."""

import os
import pathlib
import stat
import subprocess
import tempfile
import unittest

WRAPPER = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "node" / "crun-hold"
ID = "0123456789abcdef" * 4

# Records its arguments and answers `state` the way crun does for a frozen container.
FAKE_CRUN = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/calls"
case "$3" in
  state) printf '{\\n  "id": "%s",\\n  "status": "paused",\\n  "pid": 42\\n}\\n' "$4" ;;
  fail) echo "crun: boom" >&2; exit 3 ;;
esac
"""


class CrunHold(unittest.TestCase):
    def setUp(self):
        self.dir = pathlib.Path(tempfile.mkdtemp())
        fake = self.dir / "crun"
        fake.write_text(FAKE_CRUN)
        fake.chmod(0o755)
        self.holds = self.dir / "holds"
        self.holds.mkdir()
        text = WRAPPER.read_text()
        self.assertIn("\nruntime=/usr/bin/crun\n", text)
        self.assertIn("\nholds=/run/kube-migrate/holds\n", text)
        text = text.replace("\nruntime=/usr/bin/crun\n", f"\nruntime={fake}\n")
        text = text.replace("\nholds=/run/kube-migrate/holds\n", f"\nholds={self.holds}\n")
        self.wrapper = self.dir / "crun-hold"
        self.wrapper.write_text(text)
        self.wrapper.chmod(0o755)

    def run_wrapper(self, *args):
        return subprocess.run([str(self.wrapper), *args], capture_output=True, text=True, check=False)

    def calls(self):
        path = self.dir / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def test_without_a_hold_everything_passes_through(self):
        out = self.run_wrapper("--root", "/run/crun", "state", ID)
        self.assertEqual(out.returncode, 0)
        self.assertIn('"status": "paused"', out.stdout)
        self.run_wrapper("--root", "/run/crun", "resume", ID)
        self.assertEqual(self.calls(), [f"--root /run/crun state {ID}", f"--root /run/crun resume {ID}"])

    def test_a_held_container_is_reported_running_and_never_resumed(self):
        (self.holds / ID).write_text("{}")
        out = self.run_wrapper("--root", "/run/crun", "state", ID)
        self.assertEqual(out.returncode, 0)
        self.assertIn('"status": "running"', out.stdout)
        self.assertNotIn("paused", out.stdout)
        self.assertIn('"pid": 42', out.stdout)
        resumed = self.run_wrapper("--root", "/run/crun", "resume", ID)
        self.assertEqual(resumed.returncode, 0)
        # pause and everything else still reach the runtime
        self.run_wrapper("--root", "/run/crun", "pause", ID)
        self.assertEqual(self.calls(), [f"--root /run/crun state {ID}", f"--root /run/crun pause {ID}"])

    def test_the_hold_is_per_container(self):
        (self.holds / ID).write_text("{}")
        other = "f" * 64
        self.run_wrapper("--root", "/run/crun", "resume", other)
        self.assertEqual(self.calls(), [f"--root /run/crun resume {other}"])

    def test_odd_ids_never_match_a_hold(self):
        # A path in place of an ID must not let a file outside the hold directory count.
        (self.dir / "x").write_text("{}")
        self.run_wrapper("--root", "/run/crun", "resume", "../x")
        self.assertEqual(self.calls(), ["--root /run/crun resume ../x"])

    def test_runtime_errors_keep_their_status(self):
        out = self.run_wrapper("--root", "/run/crun", "fail", ID)
        self.assertEqual(out.returncode, 3)
        self.assertIn("boom", out.stderr)

    def test_a_failing_state_of_a_held_container_fails(self):
        fake = self.dir / "crun"
        fake.write_text("#!/bin/sh\necho 'no such process' >&2\nexit 1\n")
        fake.chmod(stat.S_IRWXU)
        (self.holds / ID).write_text("{}")
        out = self.run_wrapper("--root", "/run/crun", "state", ID)
        self.assertEqual(out.returncode, 1)
        self.assertEqual(out.stdout, "")
        self.assertIn("no such process", out.stderr)


if __name__ == "__main__":
    unittest.main()
