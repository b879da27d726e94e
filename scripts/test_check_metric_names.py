"""Unit tests of scripts/check_metric_names.py (its PromQL reading and its verdicts).

Run by scripts/test.sh: python3 -m unittest discover -s scripts -p 'test_*.py'
"""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(__file__))
import check_metric_names as c  # noqa: E402

SCRAPE = """# HELP kube_migrate_migrations Finished migrations by outcome and reason.
# TYPE kube_migrate_migrations counter
kube_migrate_migrations_total{outcome="failed",reason="StateLost"} 1
# TYPE kube_migrate_downtime_seconds histogram
kube_migrate_downtime_seconds_sum 1.0
kube_migrate_downtime_seconds_count 1
kube_migrate_downtime_seconds_bucket{le="0.05"} 0
kube_migrate_downtime_seconds_bucket{le="+Inf"} 1
# TYPE kube_migrate_agent_stored_bytes gauge
kube_migrate_agent_stored_bytes 1
# TYPE kube_migrate_empty gauge
# EOF
"""


def check(expr, recorded=None):
    problems = []
    c.check_query("q", expr, c.parse_scrape(SCRAPE), recorded or {}, problems)
    return problems


class Analyse(unittest.TestCase):
    def test_selectors_functions_and_grouping(self):
        selectors, grouping = c.analyse(
            'sum by (reason) (increase(foo_total{a="x", b=~"y|z"}[5m])) / on () group_left bar'
        )
        self.assertEqual(selectors, [("foo_total", ["a", "b"]), ("bar", [])])
        self.assertEqual(grouping, ["reason"])

    def test_strings_durations_numbers_and_variables_are_not_metrics(self):
        selectors, _ = c.analyse(
            'foo{a="sum(bar) baz"} offset 1h30m > 1e9 and rate(x[$__rate_interval]) < 0.5 or vector(0)'
        )
        self.assertEqual([s[0] for s in selectors], ["foo", "x"])

    def test_aggregation_with_by_after_the_operator_name(self):
        selectors, grouping = c.analyse("max without (instance) (up) unless count by (job) (up)")
        self.assertEqual([s[0] for s in selectors], ["up", "up"])
        self.assertEqual(grouping, ["instance", "job"])


class Scrape(unittest.TestCase):
    def test_sample_names_follow_the_types(self):
        served = c.parse_scrape(SCRAPE)
        self.assertIn("kube_migrate_migrations_total", served)
        self.assertNotIn("kube_migrate_migrations", served)
        self.assertEqual(served["kube_migrate_downtime_seconds_bucket"], {"le"})
        self.assertEqual(served["kube_migrate_migrations_total"], {"outcome", "reason"})
        self.assertIsNone(served["kube_migrate_empty"])


class Verdicts(unittest.TestCase):
    def test_good_queries_pass(self):
        self.assertEqual(check("sum by (reason) (increase(kube_migrate_migrations_total[5m]))"), [])
        self.assertEqual(
            check("histogram_quantile(0.9, sum by (le) (rate(kube_migrate_downtime_seconds_bucket[5m])))"), []
        )
        self.assertEqual(check('kube_migrate_agent_stored_bytes{instance="a"} and up{job="x"} == 0'), [])

    def test_unknown_metric_fails(self):
        self.assertIn("is not served", check("rate(kube_migrate_migrations[5m])")[0])

    def test_unknown_matcher_label_fails(self):
        self.assertIn("no label 'phase'", check('kube_migrate_migrations_total{phase="x"}')[0])

    def test_unknown_grouping_label_fails(self):
        self.assertIn("'node'", check("sum by (node) (kube_migrate_agent_stored_bytes)")[0])

    def test_recorded_metrics_and_their_labels(self):
        recorded = {"kube_migrate:x:rate5m": {"reason"}}
        self.assertEqual(check('kube_migrate:x:rate5m{reason="a"} > 0', recorded), [])
        self.assertEqual(len(check('kube_migrate:x:rate5m{webhook="a"} > 0', recorded)), 1)
        self.assertEqual(c.recorded_labels("sum by (outcome, reason) (x)"), {"outcome", "reason"})

    def test_labels_of_a_family_without_samples_are_unknown(self):
        self.assertIn("no sample", check('kube_migrate_empty{a="b"}')[0])


if __name__ == "__main__":
    unittest.main()
