"""Create the agentmount bucket on every S3 zone (docker/compose.yaml's one-shot `buckets` service).

agentmount needs its bucket to exist. This waits (with a deadline) for each endpoint in
$S3_ENDPOINTS to answer, creates $BUCKET there unless it exists, and exits 0; credentials
come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. It runs in the agentmount image,
whose Python has botocore.
"""
import os
import sys
import time

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

bucket = os.environ.get("BUCKET", "agentmount")
endpoints = os.environ["S3_ENDPOINTS"].split()
deadline = time.monotonic() + float(os.environ.get("TIMEOUT_S", "120"))
session = botocore.session.get_session()
for endpoint in endpoints:
    client = session.create_client("s3", region_name=os.environ.get("AWS_REGION", "us-east-1"),
                                   endpoint_url=endpoint,
                                   config=Config(s3={"addressing_style": "path"}, connect_timeout=2,
                                                 read_timeout=10, retries={"total_max_attempts": 1}))
    while True:
        try:
            client.create_bucket(Bucket=bucket)
            print(f"{endpoint}: created bucket {bucket}", flush=True)
            break
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                print(f"{endpoint}: bucket {bucket} exists", flush=True)
                break
            error = f"{code}: {e}"
        except BotoCoreError as e:   # not answering yet
            error = str(e)
        if time.monotonic() > deadline:
            sys.exit(f"{endpoint}: cannot create bucket {bucket}: {error}")
        time.sleep(0.5)
