"""Triton python-backend model: runs an ONNX Runtime lowering of a lynx-export build.

Copied by `lynx-export triton` into `<repo>/<model>/1/model.py` beside `model.ort.onnx`; it
imports only numpy, onnxruntime and Triton's backend utilities, so it runs in the server's
Python environment without lynx-export installed.

Requests that Triton's dynamic batcher hands over together are concatenated along the batch
axis when their other dimensions agree and run as one ONNX Runtime call; the outputs are split
back per request.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        threads = int(parameters.get("intra_op_num_threads", "0") or 0)
        if threads:
            options.intra_op_num_threads = threads
        path = os.path.join(args["model_repository"], args["model_version"], "model.ort.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        feeds = [{name: pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.input_names} for r in requests]
        groups = {}
        for index, feed in enumerate(feeds):
            key = tuple((name, feed[name].shape[1:], feed[name].dtype.str) for name in self.input_names)
            groups.setdefault(key, []).append(index)
        responses = [None] * len(requests)
        for indices in groups.values():
            sizes = [feeds[i][self.input_names[0]].shape[0] for i in indices]
            batch = {name: np.concatenate([feeds[i][name] for i in indices]) for name in self.input_names}
            try:
                outputs = self.session.run(self.output_names, batch)
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the client as its error
                for i in indices:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(" ".join(str(exc).split())))
                continue
            start = 0
            for i, size in zip(indices, sizes):
                tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[start : start + size])) for name, out in zip(self.output_names, outputs)]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += size
        return responses

    def finalize(self):
        self.session = None
