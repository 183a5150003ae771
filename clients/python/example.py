"""Streams one completion from the mesh through a sidecar's outbound address.

    python example.py [ADDR] --model chat --prompt "Once upon a time"

ADDR is the sidecar's outbound listener (default: $MESH_ADDR, else
127.0.0.1:7100). With $MESH_API_KEY set, the call carries
`authorization: Bearer $MESH_API_KEY`, which a sidecar with [[api_keys]]
requires. Text is printed as it arrives; with --json, one JSON object is
printed at the end instead (text, token_ids, finish_reason, usage).
"""

import argparse
import json
import os
import sys

import grpc

from mesh.v1 import mesh_pb2, mesh_pb2_grpc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("addr", nargs="?", default=os.environ.get("MESH_ADDR", "127.0.0.1:7100"))
    parser.add_argument("--model", default="chat", help="the service to call")
    parser.add_argument("--prompt", default="Explain in two sentences why batching makes LLM serving cheaper.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = parser.parse_args()

    request = mesh_pb2.GenerateRequest(
        model=args.model,
        prompt=args.prompt,
        sampling=mesh_pb2.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature),
    )
    metadata = []
    if key := os.environ.get("MESH_API_KEY"):
        metadata.append(("authorization", f"Bearer {key}"))

    text, token_ids, last = [], [], None
    with grpc.insecure_channel(args.addr) as channel:
        stub = mesh_pb2_grpc.GenerationStub(channel)
        try:
            for message in stub.Generate(request, metadata=metadata):
                text.append(message.text)
                token_ids.extend(message.token_ids)
                last = message
                if not args.json:
                    print(message.text, end="", flush=True)
        except grpc.RpcError as e:
            if text and not args.json:
                print()  # end the partial line
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1

    if last is None:
        print("error: the stream ended without a message", file=sys.stderr)
        return 1
    # The last message carries the finish reason and usage.
    if args.json:
        usage = {field.name: getattr(last.usage, field.name) for field in last.usage.DESCRIPTOR.fields}
        print(json.dumps({
            "text": "".join(text),
            "token_ids": token_ids,
            "finish_reason": mesh_pb2.FinishReason.Name(last.finish_reason),
            "usage": usage,
        }))
    else:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
