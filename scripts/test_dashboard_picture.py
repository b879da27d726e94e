"""Unit tests of scripts/dashboard_picture.py (run by scripts/test.sh: unittest discover)."""

import os
import sys
import unittest
from unittest import mock

sys.path.insert(0, os.path.dirname(__file__))
os.chdir(os.path.join(os.path.dirname(__file__), ".."))
import dashboard_picture as dp  # noqa: E402


class DashboardPicture(unittest.TestCase):
    def test_grafana_variables_are_replaced(self):
        target = {"expr": 'sum(increase(x{node=~"$node"}[$__range])) / rate(y[$__rate_interval])'}
        self.assertEqual(dp.expr_of(target, 100, 400), 'sum(increase(x{node=~".*"}[300s])) / rate(y[20s])')

    def test_legends_follow_grafana(self):
        self.assertEqual(dp.label_of({"webhook": "eviction", "result": "allowed"}, "{{webhook}} {{result}}"), "eviction allowed")
        self.assertEqual(dp.label_of({"b": "2", "a": "1"}, ""), "a=1,b=2")

    def test_the_named_panels_exist_in_the_dashboard(self):
        import json

        self.assertEqual(len(dp.panels(json.load(open(dp.DASHBOARD)))), len(dp.PANELS))

    def test_a_panel_without_data_fails_the_run(self):
        def answer(prom, path, params):
            # Everything has a series but the admission decisions.
            if "webhook_decisions" in params["query"]:
                return []
            if path == "query":
                return [{"metric": {"node": "node-a"}, "value": [1, "3.5"]}]
            return [{"metric": {"phase": "send"}, "values": [[1, "1"], [3, "2"]]}]

        with mock.patch.object(dp, "query", answer), mock.patch.object(sys, "argv", ["x", "http://p", "0", "60"]):
            with self.assertRaises(SystemExit) as exit:
                dp.main()
        self.assertEqual(exit.exception.code, 1)


if __name__ == "__main__":
    unittest.main()
