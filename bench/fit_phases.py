"""Peak resident memory of a streamed `fit`, per phase: the CLI run in this process, its steps wrapped.

A thread samples VmRSS and RssAnon (/proc/self/status) every 30 ms and books each sample to the
innermost running step of the streamed fit (calibration, the other weights' costs, the candidates'
walk and its parts, the writing). Used to find where bench/fit_scale.py's run spent its memory,
on the 2-layer build of the same shapes (bench/scale.py's builder):

    python bench/fit_phases.py fit /tmp/fitscale/qwen3_moe-2L --memory 1656553267B --out /tmp/fitscale/fitted2 \
        --calib bundled --samples 8 --seq-len 128 --eval-windows 2 --eval-seq-len 128 --streaming on

(with MOE_COMPRESS_CACHE pointing at an empty directory, so that it calibrates). Prints one PHASE line
per step to stderr; results by hand in bench/results/fit_scale.md.
"""
import functools
import importlib
import sys
import threading
import time

phase = ["start"]
peaks, order = {}, []
def sample():
    while True:
        d = {}
        for line in open("/proc/self/status"):
            if line.startswith(("VmRSS", "RssAnon")):
                k, v = line.split(":"); d[k] = int(v.split()[0]) * 1024
        name = "/".join(phase)
        if name not in peaks:
            peaks[name] = {"VmRSS": 0, "RssAnon": 0}; order.append(name)
        for k in d:
            peaks[name][k] = max(peaks[name][k], d[k])
        time.sleep(0.03)
threading.Thread(target=sample, daemon=True).start()
def wrap(modname, attr, label=None):
    mod = importlib.import_module(modname)
    fn = getattr(mod, attr)
    @functools.wraps(fn)
    def inner(*a, **k):
        phase.append(label or attr)
        try:
            return fn(*a, **k)
        finally:
            phase.pop()
    setattr(mod, attr, inner)
for m, a in [("moe_compress.engine.statistics", "collect_statistics"), ("moe_compress.fitting.streamed", "streamed_other_costs"),
             ("moe_compress.fitting.steps", "search"), ("moe_compress.fitting.streamed_measure", "measure_streamed"),
             ("moe_compress.fitting.streamed_measure", "_edited"), ("moe_compress.fitting.streamed_measure", "_forward"),
             ("moe_compress.fitting.streamed_measure", "_log_probs"), ("moe_compress.fitting.streamed_measure", "layer_actions"),
             ("moe_compress.walk.capture", "capture_layer_inputs"),
             ("moe_compress.fitting.streamed_write", "write_best_streamed"), ("moe_compress.stages.prune", "prune"),
             ("moe_compress.slimming.quantize", "quantize"), ("moe_compress.source.load", "load_streamed")]:
    wrap(m, a)
import moe_compress.fitting.streamed_measure as sm, moe_compress.walk.capture as cap
sm.capture_layer_inputs = cap.capture_layer_inputs
from moe_compress.cli import main
try:
    sys.argv = ["moe-compress", *sys.argv[1:]]
    main()
except SystemExit as e:
    pass
finally:
    g = 2**30
    for name in order:
        p = peaks[name]
        print(f"PHASE {name[:90]:90s} rss {p['VmRSS']/g:.2f} anon {p['RssAnon']/g:.2f}", file=sys.stderr)
