"""Calls one iotsecuretunneling operation with boto3 and prints the response as JSON.

usage: tunnels.py ENDPOINT_URL operation_name '{"json": "params"}'
A service error prints {"error": code, "message": ...} and exits 1.
"""
import json
import sys

import boto3
import botocore.config
import botocore.exceptions

endpoint, op = sys.argv[1], sys.argv[2]
params = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
client = boto3.client(
    "iotsecuretunneling",
    endpoint_url=endpoint,
    region_name="us-east-1",
    aws_access_key_id="x",
    aws_secret_access_key="y",
    config=botocore.config.Config(retries={"max_attempts": 1}),
)
try:
    response = getattr(client, op)(**params)
except botocore.exceptions.ClientError as e:
    print(json.dumps({"error": e.response["Error"]["Code"], "message": e.response["Error"]["Message"]}))
    sys.exit(1)
response.pop("ResponseMetadata", None)
print(json.dumps(response, default=str))
