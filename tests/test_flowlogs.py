"""Flow-log importers (Zeek conn.log TSV/JSON, Argus .binetflow) and the `history` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from connpub.cli import main
from connpub.errors import ConnpubError
from connpub.traffic import flowlogs as fl
from connpub.traffic import workload as wl
from connpub.traffic.trace import read_history, write_history, write_trace

TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
if not TRACES.is_dir():  # a worktree under /work/wt/NAME
    TRACES = Path("/work/shared/traces")

ZEEK_TSV = """#separator \\x09
#set_separator\t,
#empty_field\t(empty)
#unset_field\t-
#path\tconn
#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tproto\tservice\tduration\t\
orig_bytes\tresp_bytes\tconn_state\tlocal_orig\tlocal_resp\tmissed_bytes\thistory\torig_pkts\t\
orig_ip_bytes\tresp_pkts\tresp_ip_bytes\ttunnel_parents
#types\ttime\tstring\taddr\tport\taddr\tport\tenum\tstring\tinterval\tcount\tcount\tstring\t\
bool\tbool\tcount\tstring\tcount\tcount\tcount\tcount\tset[string]
100.5\tC1\t10.0.0.1\t40000\t10.0.0.2\t443\ttcp\tssl\t12.25\t900\t5000\tSF\tT\tF\t0\t\
ShADadFf\t10\t1420\t9\t5500\t(empty)
101.0\tC2\t2001:db8::1\t5353\tff02::fb\t53\tudp\tdns\t-\t-\t-\tS0\tF\tF\t0\tD\t1\t80\t0\t0\t-
102.0\tC3\t10.0.0.1\t0\t10.0.0.9\t8\ticmp\t-\t0.1\t8\t8\tOTH\tT\tF\t0\t-\t1\t36\t1\t36\t-
#close\t2020-01-01-00-00-00
"""

ARGUS = """StartTime,Dur,Proto,SrcAddr,Sport,Dir,DstAddr,Dport,State,sTos,dTos,TotPkts,TotBytes,\
SrcBytes,srcUdata,dstUdata,Label
2013/12/17 22:09:19.500617,10.5,tcp,10.0.0.46,60808,  <?>,78.47.102.65,443,FSPA_FSPA,0,0,20,\
8000,2000,s[1]=x,d[1]=y,
2013/12/17 22:09:18.000000,0.000,udp,10.0.0.46,53000,   <->,8.8.8.8,53,CON,0,0,2,180,80,,,
2013/12/17 22:09:20.000000,483.5,icmp,209.85.251.178,0x000b,   ->,10.0.0.46,0x0000,TXD,0,,479,\
87178,87178,,,
"""


def test_zeek_tsv_records_become_flows_without_sketch(tmp_path):
    log = tmp_path / "conn.log"
    log.write_text(ZEEK_TSV)
    flows = fl.read_zeek_conn(log)
    assert flows.size == 2  # icmp dropped
    tcp, udp = flows[0], flows[1]
    assert tcp["start_ns"] == 0 and tcp["end_ns"] == 12_250_000_000
    assert udp["start_ns"] == 500_000_000 and udp["end_ns"] == udp["start_ns"]  # unset: 0 s
    assert (tcp["proto"], tcp["client_port"], tcp["vip_port"]) == (6, 40000, 443)
    assert bytes(tcp["client_addr"]) == bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])
    assert bytes(udp["client_addr"])[:2] == b"\x20\x01" and udp["vip_port"] == 53
    assert (tcp["bytes"], tcp["packets"]) == (1420, 10)  # orig_ip_bytes, orig_pkts
    assert (udp["bytes"], udp["packets"]) == (80, 1)
    assert tcp["tcp_flags"] == wl.TCP_SYN | wl.TCP_ACK | wl.TCP_PSH | wl.TCP_FIN
    assert tcp["first_tcp_flags"] == wl.TCP_SYN
    assert (flows["first_n"] == 0).all() and (flows["app_class"] == 255).all()
    assert flows["flow_id"].tolist() == [1, 2]


def test_zeek_json_lines_match_tsv(tmp_path):
    tsv = tmp_path / "conn.log"
    tsv.write_text(ZEEK_TSV)
    records = [
        {"ts": 100.5, "uid": "C1", "id.orig_h": "10.0.0.1", "id.orig_p": 40000,
         "id.resp_h": "10.0.0.2", "id.resp_p": 443, "proto": "tcp", "duration": 12.25,
         "orig_bytes": 900, "history": "ShADadFf", "orig_pkts": 10, "orig_ip_bytes": 1420},
        {"ts": 101.0, "uid": "C2", "id.orig_h": "2001:db8::1", "id.orig_p": 5353,
         "id.resp_h": "ff02::fb", "id.resp_p": 53, "proto": "udp", "history": "D",
         "orig_pkts": 1, "orig_ip_bytes": 80},
    ]
    jsonl = tmp_path / "conn.json"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert fl.read_zeek_conn(jsonl).tobytes() == fl.read_zeek_conn(tsv).tobytes()


def test_argus_records_become_flows(tmp_path):
    path = tmp_path / "x.binetflow"
    path.write_text(ARGUS)
    flows = fl.read_argus_binetflow(path)
    assert flows.size == 2
    udp, tcp = flows[0], flows[1]  # sorted by start: the UDP record starts 1.5 s earlier
    assert udp["start_ns"] == 0 and tcp["start_ns"] == 1_500_617_000
    assert tcp["end_ns"] - tcp["start_ns"] == 10_500_000_000
    assert (tcp["bytes"], tcp["packets"]) == (2000, 5)  # 20 packets * 2000 / 8000
    assert (udp["bytes"], udp["packets"]) == (80, 1)
    assert tcp["vip_port"] == 443 and udp["vip_port"] == 53
    assert tcp["tcp_flags"] == wl.TCP_SYN | wl.TCP_ACK | wl.TCP_PSH | wl.TCP_FIN
    assert (flows["first_n"] == 0).all()


@pytest.mark.parametrize("text, message", [
    ("#fields\tts\tid.orig_h\n1\t2\n", "#fields lacks"),
    ("1.0\t10.0.0.1\n", "record before the #fields header"),
    (ZEEK_TSV.replace("10.0.0.2\t443", "10.0.0.2\t443\textra"), "fields, #fields names"),
    (ZEEK_TSV.replace("10.0.0.2", "ten.0.0.2"), "not an IP address"),
    (ZEEK_TSV.replace("\t12.25\t", "\tlong\t"), "duration = 'long' is not a number"),
    ('{"ts": 1}\n', "lacks id.orig_h"),
    ("{not json\n", "not a JSON object"),
])
def test_bad_zeek_logs_refused(tmp_path, text, message):
    log = tmp_path / "bad.log"
    log.write_text(text)
    with pytest.raises(ConnpubError, match=message):
        fl.read_zeek_conn(log)


def test_bad_argus_and_missing_files_refused(tmp_path):
    bad = tmp_path / "bad.binetflow"
    bad.write_text("StartTime,Dur,Proto\n1,2,tcp\n")
    with pytest.raises(ConnpubError, match="header lacks SrcAddr"):
        fl.read_argus_binetflow(bad)
    bad.write_text(ARGUS.replace("60808", "port"))
    with pytest.raises(ConnpubError, match="port 'port' is not a number"):
        fl.read_argus_binetflow(bad)
    with pytest.raises(ConnpubError, match="no such file"):
        fl.read_zeek_conn(tmp_path / "missing.log")
    with pytest.raises(ConnpubError, match="unknown flow source"):
        fl.read_flow_source(tmp_path / "x.csv")


def test_real_logs_import(tmp_path):
    zeek = fl.read_zeek_conn(TRACES / "zeek" / "001-zeek-scenario-malicious.conn.log")
    argus = fl.read_argus_binetflow(TRACES / "argus" / "CTU-Normal-7-2013-13-07.binetflow")
    # 1000 lines (8 header) / 9797 records, ICMP and other protocols left out
    assert zeek.size == 669 and argus.size == 2469
    assert int((argus["proto"] == 17).sum()) == 2034 and int((argus["proto"] == 6).sum()) == 435
    for flows in (zeek, argus):
        assert (flows["end_ns"] >= flows["start_ns"]).all() and (flows["first_n"] == 0).all()
        assert np.isin(flows["proto"], (6, 17)).all()


def test_concat_and_plausible_flows():
    a = wl.generate("mixed", 50, seed=1)
    b = wl.generate("mixed", 30, seed=2)
    b["end_ns"][0] = b["start_ns"][0] + 2 * 86_400 * 10**9  # a spliced-capture artefact
    b["start_ns"][1:] += 10**18  # a capture with a years-long gap
    b["end_ns"][1:] += 10**18
    merged = fl.concat_sources([a, fl.plausible_flows(b)])
    assert merged.size == 79 and merged["flow_id"].tolist() == list(range(1, 80))
    assert merged["start_ns"][:50].min() == 0
    assert merged["start_ns"][50:].min() == merged["end_ns"][:50].max() + 86_400 * 10**9
    assert merged["start_ns"].max() < 10**15
    durations = merged["end_ns"] - merged["start_ns"]
    kept = fl.plausible_flows(b)
    assert np.array_equal(np.sort(durations[50:]), np.sort(kept["end_ns"] - kept["start_ns"]))


def test_flow_table_from_history_and_trace(tmp_path):
    flows = wl.generate("mixed", 200, seed=3)
    write_trace(flows, tmp_path / "t.parquet")
    assert fl.read_flow_source(tmp_path / "t.parquet").tobytes() == flows.tobytes()
    from connpub.traffic.trace import history_from_flows

    write_history(history_from_flows(flows), tmp_path / "h.parquet")
    back = fl.read_flow_source(tmp_path / "h.parquet")
    for name in ("start_ns", "end_ns", "packets", "bytes", "first_n", "vip_port"):
        assert np.array_equal(back[name], flows[name]), name
    # the sketch as sums: same count, sum within rounding, same total gap
    assert np.abs(back["first_sizes"].sum(axis=1).astype(np.int64)
                  - flows["first_sizes"].sum(axis=1).astype(np.int64)).max() <= 4
    assert np.abs(back["first_iat_ns"].sum(axis=1).astype(np.int64)
                  - flows["first_iat_ns"].sum(axis=1).astype(np.int64)).max() <= 8


def test_history_cli_imports(tmp_path):
    runner = CliRunner()
    log = tmp_path / "conn.log"
    log.write_text(ZEEK_TSV)
    out = tmp_path / "zeek.parquet"
    result = runner.invoke(main, ["history", "from-zeek", str(log), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["flows"], summary["tcp"], summary["udp"], summary["without_sketch"]) == (
        2, 1, 1, 2)
    history = read_history(out)
    assert history.size == 2 and history["duration_ns"].tolist() == [12_250_000_000, 0]
    argus = tmp_path / "a.binetflow"
    argus.write_text(ARGUS)
    result = runner.invoke(main, ["history", "from-argus", str(argus), "--out",
                                  str(tmp_path / "a.parquet")])
    assert result.exit_code == 0, result.output
    trace = tmp_path / "t.parquet"
    write_trace(wl.generate("web", 100, seed=4), trace)
    result = runner.invoke(main, ["history", "from-trace", str(trace), "--out",
                                  str(tmp_path / "th.parquet"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["without_sketch"] == 0
    empty = tmp_path / "icmp.log"
    empty.write_text("\n".join(line for line in ZEEK_TSV.splitlines() if "\ttcp\t" not in line
                               and "\tudp\t" not in line))
    result = runner.invoke(main, ["history", "from-zeek", str(empty), "--out",
                                  str(tmp_path / "none.parquet")])
    assert result.exit_code == 2 and "no TCP/UDP flows" in result.output
    assert not (tmp_path / "none.parquet").exists()


def test_model_train_and_eval_on_real_sources(tmp_path):
    """The path the issue found missing: a `trace from-pcap` output and a Zeek log straight
    into `model train`, then `model eval --online --json` with the honest keys."""
    runner = CliRunner()
    trace = tmp_path / "firefox.parquet"
    result = runner.invoke(main, ["trace", "from-pcap", str(TRACES / "ndpi" / "443-firefox.pcap"),
                                  "--out", str(trace)])
    assert result.exit_code == 0, result.output
    zeek = TRACES / "zeek" / "001-zeek-scenario-malicious.conn.log"
    argus = TRACES / "argus" / "CTU-Normal-7-2013-13-07.binetflow"
    model = tmp_path / "real.onnx"
    result = runner.invoke(main, ["model", "train", "--history", str(trace), "--history",
                                  str(zeek), "--history", str(argus), "--out", str(model),
                                  "--max-iter", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["calibration"] == "cross-source"
    result = runner.invoke(main, ["model", "eval", "--history", str(zeek), "--model",
                                  str(model), "--online", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    for key in ("mae", "baseline_mae", "baseline_own_mae", "age_only_mae", "coverage", "rows"):
        assert key in metrics
    assert metrics["baseline_source"] == "training"
    assert metrics["rows"] == sum(part["rows"] for part in metrics["by_protocol"].values())
    result = runner.invoke(main, ["model", "train", "--history", str(zeek), "--out",
                                  str(model), "--calibration", "cross-source"])
    assert result.exit_code == 2 and "at least two --history" in result.output
