"""libgetar (PyPI gtar 1.1.7, numpy<2 venv) reads what GTARLogger wrote via the daemon."""
import json

import numpy as np

from conftest import run_oracle
from gtar_logd.keras import GTARLogger
from kerasutil import Capture, data, make_model, same

# keras_gtar 1.1.0's Trajectory.get_weights, restated with plain libgetar,
# plus direct reads of keras_gtar's exact record paths.
ORACLE = r'''
import collections, json, re, sys
import numpy as np
import gtar
path, group, out, layout = sys.argv[1], sys.argv[2] or None, sys.argv[3], json.loads(sys.argv[4])
arrays = {}
with gtar.GTAR(path, 'r') as h:
    (_, frames) = h.framesWithRecordsNamed('weight', group_prefix=group)
    pat = re.compile(r'keras/layer/(?P<layer>\d+)/weight/(?P<weight>\d+)')
    weight_records = collections.defaultdict(dict)
    shape_records = collections.defaultdict(dict)
    for rec in h.getRecordTypes():
        if group is not None and not rec.getGroup().startswith(group):
            continue
        m = pat.search(rec.getGroup())
        if not m:
            continue
        i, j = int(m.group('layer')), int(m.group('weight'))
        if rec.getName() == 'weight':
            weight_records[i][j] = rec
        elif rec.getName() == 'shape':
            shape_records[i][j] = rec
    for f in frames:
        k = 0
        for i, recs in sorted(weight_records.items()):
            for j in range(len(recs)):
                shape = h.getRecord(shape_records[i][j], f)
                arrays['kg/%s/%d' % (f, k)] = h.getRecord(recs[j], f).reshape(shape)
                k += 1
        for n, (i, j) in enumerate(layout):
            p = '%skeras/layer/%d/weight/%d/' % (group + '/' if group else '', i, j)
            w = h.readPath(p + 'frames/%s/weight.f32.uni' % f)
            s = h.readPath(p + 'shape.u32.uni')
            arrays['path/%s/%d' % (f, n)] = np.asarray(w).reshape(s)
    model_json = h.readStr(('%s/' % group if group else '') + 'keras/model.json')
np.savez(out, **arrays)
print(json.dumps({'frames': list(frames), 'model_json': model_json}))
'''


def _layout(model):
    return [[i, j] for i, layer in enumerate(model.layers) for j in range(len(layer.weights))]


def test_libgetar_reads_keras_gtar_paths(own_daemon, tmp_path):
    runs = {}
    for group in ("", "g1"):
        archive = f"oracle-{group or 'root'}.zip"
        model = make_model(seed=11)
        cap = Capture()
        x, y = data()
        model.fit(x, y, batch_size=16, epochs=3, verbose=0, shuffle=False,
                  callbacks=[GTARLogger(archive, group=group or None, address=own_daemon.address,
                                        save_optimizer="always", log_metrics="both"), cap])
        runs[group] = (archive, model, cap)
    assert own_daemon.stop() == 0  # archives closed with their central directory
    for group, (archive, model, cap) in runs.items():
        out = tmp_path / f"{group or 'root'}.npz"
        res = json.loads(run_oracle(ORACLE, own_daemon.path(archive), group, out,
                                    json.dumps(_layout(model))))
        assert res["frames"] == ["0", "1", "2"]
        assert json.loads(res["model_json"]) == json.loads(model.to_json())
        got = np.load(out, allow_pickle=False)
        n = len(model.get_weights())
        for e in range(3):
            same([got[f"kg/{e}/{k}"] for k in range(n)], cap.post_epoch[e])
            same([got[f"path/{e}/{k}"] for k in range(n)], cap.post_epoch[e])
