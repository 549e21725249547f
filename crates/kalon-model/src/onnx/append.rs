//! Appending nodes to an existing ONNX file without decoding all of it.
//!
//! A user's tower may use any part of `onnx.proto`; decoding it into
//! Kalon's partial messages and writing it back would drop what those
//! messages do not model. Instead the file is walked as raw protobuf: every
//! field is copied byte for byte except the few that change (the graph, the
//! node that produced the output, renamed), and the new nodes and weights
//! are appended to the graph (protobuf repeated fields concatenate).

use prost::encoding::{decode_varint, encode_varint};
use prost::Message;

use super::proto::{GraphProto, NodeProto, TensorProto};

/// One field of a message: its number, wire type, payload and whole bytes.
struct Field<'a> {
    number: u64,
    wire: u8,
    payload: &'a [u8],
    whole: &'a [u8],
}

fn fields(mut bytes: &[u8]) -> anyhow::Result<Vec<Field<'_>>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let start = bytes;
        let mut cursor = bytes;
        let key = decode_varint(&mut cursor)?;
        let (number, wire) = (key >> 3, (key & 7) as u8);
        let payload_len = match wire {
            0 => {
                let before = cursor.len();
                let mut probe = cursor;
                decode_varint(&mut probe)?;
                before - probe.len()
            }
            1 => 8,
            2 => {
                let len = decode_varint(&mut cursor)? as usize;
                anyhow::ensure!(len <= cursor.len(), "truncated field {number}");
                len
            }
            5 => 4,
            other => anyhow::bail!("unsupported wire type {other} in field {number}"),
        };
        anyhow::ensure!(payload_len <= cursor.len(), "truncated field {number}");
        let payload = &cursor[..payload_len];
        let used = start.len() - cursor.len() + payload_len;
        out.push(Field {
            number,
            wire,
            payload,
            whole: &start[..used],
        });
        bytes = &start[used..];
    }
    Ok(out)
}

fn put_len_field(out: &mut Vec<u8>, number: u64, payload: &[u8]) {
    encode_varint((number << 3) | 2, out);
    encode_varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// A node with output `from` renamed to `to` (other fields kept verbatim).
fn rename_node_output(node: &[u8], from: &str, to: &str) -> anyhow::Result<(Vec<u8>, bool)> {
    let mut out = Vec::with_capacity(node.len() + 16);
    let mut renamed = false;
    for f in fields(node)? {
        if f.number == 2 && f.wire == 2 && f.payload == from.as_bytes() {
            put_len_field(&mut out, 2, to.as_bytes());
            renamed = true;
        } else {
            out.extend_from_slice(f.whole);
        }
    }
    Ok((out, renamed))
}

/// Rewrites `model` (an `.onnx` file's bytes) so graph output `output` is
/// computed by `extra` from what produced it before, now named `backbone`
/// (a name not yet in the graph). `extra` nodes must read that name and
/// write `output`; `weights` are added as initializers.
pub fn append_to_output(
    model: &[u8],
    output: &str,
    backbone: &str,
    extra: Vec<NodeProto>,
    weights: Vec<TensorProto>,
) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(model.len() + 4096);
    let mut found_graph = false;
    for f in fields(model)? {
        if f.number != 7 || f.wire != 2 {
            out.extend_from_slice(f.whole);
            continue;
        }
        found_graph = true;
        let mut graph = Vec::with_capacity(f.payload.len() + 4096);
        let mut producers = 0;
        for g in fields(f.payload)? {
            if g.number == 1 && g.wire == 2 {
                let (node, renamed) = rename_node_output(g.payload, output, backbone)?;
                producers += usize::from(renamed);
                put_len_field(&mut graph, 1, &node);
            } else {
                graph.extend_from_slice(g.whole);
            }
        }
        anyhow::ensure!(
            producers == 1,
            "expected one node producing {output}, found {producers}"
        );
        let addition = GraphProto {
            node: extra.clone(),
            initializer: weights.clone(),
            ..Default::default()
        };
        graph.extend_from_slice(&addition.encode_to_vec());
        put_len_field(&mut out, 7, &graph);
    }
    anyhow::ensure!(found_graph, "the model has no graph");
    Ok(out)
}
