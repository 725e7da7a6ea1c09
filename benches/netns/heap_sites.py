"""The allocation sites live at a dhat profile's peak (t-gmax), largest
first: what each holds per connection, and the frames of this project and
tokio that allocated it. Used by profile.sh memory.

    heap_sites.py DHAT_JSON CONNECTIONS [SITES]
"""
import json
import re
import sys


def main():
    profile = json.load(open(sys.argv[1]))
    connections = int(sys.argv[2])
    shown = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    frames = profile["ftbl"]
    sites = sorted(profile["pps"], key=lambda p: -p.get("gb", 0))
    print(f"largest sites at the peak ({connections} connections held):")
    for site in sites[:shown]:
        if site.get("gb", 0) == 0:
            break
        ours = [
            re.sub(r"^0x[0-9a-f]+: ", "", frames[f]).split(" (")[0]
            for f in site["fs"]
            if ("portcullis" in frames[f] or "tokio" in frames[f]) and "dhat" not in frames[f]
        ]
        where = ours[0][:110] if ours else "(outside this project)"
        print(
            f"  {site['gb'] / connections:8.1f} B per connection"
            f" in {site['gbk']:6} blocks  {where}"
        )


if __name__ == "__main__":
    main()
