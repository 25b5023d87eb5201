//! Classic pcap files through the `pcap-file` crate's slice parser. Its raw packets
//! are used, not its checked ones: the checked reader refuses a packet whose wire
//! length exceeds the file's snaplen, which every capture taken with `tcpdump -s N`
//! has (here such packets are explained as captured, with a note).

use pcap_file::{
    pcap::{PcapHeader, PcapParser, PcapWriter, RawPcapPacket},
    DataLink, PcapError, TsResolution,
};

/// LINKTYPE_ETHERNET.
pub const LINKTYPE_ETHERNET: u32 = 1;
/// LINKTYPE_RAW: bare IPv4/IPv6 packets.
pub const LINKTYPE_RAW: u32 = 101;
pub const LINKTYPE_IPV4: u32 = 228;
pub const LINKTYPE_IPV6: u32 = 229;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub ts_sec: u32,
    /// Microseconds, or nanoseconds in a nanosecond file.
    pub ts_frac: u32,
    /// Length of the packet on the wire; `data` may be shorter (snaplen).
    pub orig_len: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    pub linktype: u32,
    pub snaplen: u32,
    pub nanos: bool,
    pub records: Vec<Record>,
}

/// Reads a classic (libpcap) capture: either byte order, micro- or
/// nanosecond timestamps. pcapng is recognised and refused.
pub fn read(b: &[u8]) -> Result<Capture, String> {
    if b.starts_with(&[0x0a, 0x0d, 0x0d, 0x0a]) {
        return Err(
            "this is a pcapng file; write a classic pcap instead (`tcpdump -w`, `editcap -F pcap in.pcapng out.pcap`)"
                .into(),
        );
    }
    let (mut rest, parser) = PcapParser::new(b).map_err(|e| match e {
        PcapError::IncompleteBuffer => format!(
            "not a pcap file: {} bytes, shorter than the 24-byte file header",
            b.len()
        ),
        _ => format!("not a pcap file (magic {:02x?})", &b[..4]),
    })?;
    let h = parser.header();
    // The top bits of the link-type word may carry FCS information.
    let linktype = u32::from(h.datalink) & 0x0fff_ffff;
    let mut records = Vec::new();
    while !rest.is_empty() {
        let n = records.len() + 1;
        if rest.len() >= 16 {
            // incl_len, in the file's byte order, before the parser trusts it.
            let w = [rest[8], rest[9], rest[10], rest[11]];
            let incl = match h.endianness {
                pcap_file::Endianness::Big => u32::from_be_bytes(w),
                pcap_file::Endianness::Little => u32::from_le_bytes(w),
            };
            if incl > 262_144 {
                return Err(format!(
                    "record {n}: captured length {incl} is not plausible (corrupt file?)"
                ));
            }
        }
        let (r, p): (&[u8], RawPcapPacket) = parser.next_raw_packet(rest).map_err(|e| match e {
            PcapError::IncompleteBuffer if rest.len() < 16 => {
                format!("record {n}: the file ends inside its header (truncated capture?)")
            }
            PcapError::IncompleteBuffer => {
                format!("record {n}: the file ends inside its data (truncated capture?)")
            }
            e => format!("record {n}: {e}"),
        })?;
        records.push(Record {
            ts_sec: p.ts_sec,
            ts_frac: p.ts_frac,
            orig_len: p.orig_len,
            data: p.data.into_owned(),
        });
        rest = r;
    }
    Ok(Capture {
        linktype,
        snaplen: h.snaplen,
        nanos: h.ts_resolution == TsResolution::NanoSecond,
        records,
    })
}

/// Writes a classic little-endian microsecond pcap (timestamps 1 ms apart).
pub fn write(linktype: u32, frames: &[Vec<u8>]) -> Vec<u8> {
    let header = PcapHeader {
        snaplen: 262_144,
        datalink: DataLink::from(linktype),
        endianness: pcap_file::Endianness::Little,
        ..PcapHeader::default()
    };
    let mut w = PcapWriter::with_header(Vec::new(), header).expect("writing to memory");
    for (i, f) in frames.iter().enumerate() {
        let ms = i as u32;
        let len = f.len() as u32;
        w.write_raw_packet(&RawPcapPacket {
            ts_sec: ms / 1000,
            ts_frac: (ms % 1000) * 1000,
            incl_len: len,
            orig_len: len,
            data: f.as_slice().into(),
        })
        .expect("writing to memory");
    }
    w.into_writer()
}
