"""The comparing harness: a runner that runs the reference, its rounding-noise copy and each
(model, provider) pair over DATA (runner), a judge that turns their outputs into verdicts
(judge, metrics, noise, tolerances, matching), the report and its renderers (results, report,
render_json, render_text, render_html), and compare, which puts them together; stability and
fp16 for `compare --stability`."""
