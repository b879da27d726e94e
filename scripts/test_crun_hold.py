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
echo "${CRIU_CONFIG_FILE-unset}" >> "$(dirname "$0")/criu_config"
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
        self.assertIn("\ncriu_conf=/etc/kube-migrate/criu.conf\n", text)
        self.criu_conf = self.dir / "criu.conf"
        self.criu_conf.write_text("tcp-close\n")
        text = text.replace("\nruntime=/usr/bin/crun\n", f"\nruntime={fake}\n")
        text = text.replace("\nholds=/run/kube-migrate/holds\n", f"\nholds={self.holds}\n")
        text = text.replace("\ncriu_conf=/etc/kube-migrate/criu.conf\n", f"\ncriu_conf={self.criu_conf}\n")
        self.wrapper = self.dir / "crun-hold"
        self.wrapper.write_text(text)
        self.wrapper.chmod(0o755)

    def run_wrapper(self, *args, env=None):
        env = {k: v for k, v in os.environ.items() if k != "CRIU_CONFIG_FILE"} | (env or {})
        return subprocess.run([str(self.wrapper), *args], capture_output=True, text=True, check=False, env=env)

    def criu_config(self):
        """CRIU_CONFIG_FILE as each runtime call saw it ("unset" where it was not set)."""
        return (self.dir / "criu_config").read_text().splitlines()

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

    # The calls as the wrapper saw them on the real nodes: CRI-O 1.34.0's checkpoint, conmon
    # 2.1.12's restore (paths shortened).
    CHECKPOINT = ("--root", "/run/crun", "checkpoint", "--file-locks", "--image-path", "/x/userdata/checkpoint",
                  "--work-path", "/x/userdata", "--leave-running", ID)
    RESTORE = ("--root=/run/crun", "restore", "--bundle", "/r/userdata", "--pid-file", "/r/userdata/pidfile",
               "--detach", "--image-path", "/x/userdata/checkpoint", "--work-path", "/r/userdata", ID)

    def test_checkpoint_and_restore_get_kube_migrates_criu_options(self):
        self.assertEqual(self.run_wrapper(*self.CHECKPOINT).returncode, 0)
        self.assertEqual(self.run_wrapper(*self.RESTORE).returncode, 0)
        self.assertEqual(self.criu_config(), [str(self.criu_conf)] * 2)
        # the arguments reach the runtime unchanged
        self.assertEqual(self.calls(), [" ".join(self.CHECKPOINT), " ".join(self.RESTORE)])

    def test_a_held_container_is_checkpointed_with_them_too(self):
        (self.holds / ID).write_text("{}")
        self.run_wrapper(*self.CHECKPOINT)
        self.assertEqual(self.criu_config(), [str(self.criu_conf)])

    def test_no_other_call_gets_them(self):
        for cmd in ("state", "pause", "resume", "delete", "kill", "start"):
            self.run_wrapper("--root", "/run/crun", cmd, ID)
        self.run_wrapper("--root", "/run/crun", "create", "--bundle", "/x", "--pid-file", "/x/pid", ID)
        self.run_wrapper("--root", "/run/crun", "exec", "--process", "/x/p.json", ID)
        self.assertEqual(self.criu_config(), ["unset"] * 8)

    def test_without_the_file_nothing_is_set(self):
        self.criu_conf.unlink()
        self.run_wrapper(*self.CHECKPOINT)
        self.run_wrapper(*self.RESTORE)
        self.assertEqual(self.criu_config(), ["unset"] * 2)

    def test_a_config_file_set_by_the_node_is_kept(self):
        self.run_wrapper(*self.CHECKPOINT, env={"CRIU_CONFIG_FILE": "/etc/criu/mine.conf"})
        self.assertEqual(self.criu_config(), ["/etc/criu/mine.conf"])


if __name__ == "__main__":
    unittest.main()
