//! Kalon's own ONNX writer: a small graph builder over the ONNX protobuf.
//!
//! Models are written with IR version 8 and the default-domain opset 17,
//! which ONNX Runtime 1.31 (and every release since 1.13) loads. Weights are
//! initializers with raw little-endian data.

pub mod append;
pub mod proto;

use prost::Message;

use proto::*;

/// IR version written (ONNX 1.12+; ONNX Runtime 1.31 reads up to 11+).
pub const IR_VERSION: i64 = 8;
/// Default-domain opset written.
pub const OPSET: i64 = 17;

/// A tensor dimension in a graph input or output.
#[derive(Debug, Clone, Copy)]
pub enum Dim<'a> {
    Fixed(i64),
    Named(&'a str),
}

/// Element types Kalon's graphs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32,
    I64,
    /// Only for tests that need a model breaking the contract.
    I32,
    F16,
}

impl Elem {
    fn code(self) -> i32 {
        match self {
            Elem::F32 => data_type::FLOAT,
            Elem::I64 => data_type::INT64,
            Elem::I32 => data_type::INT32,
            Elem::F16 => data_type::FLOAT16,
        }
    }
}

pub fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i: Some(value),
        r#type: attribute_type::INT,
        ..Default::default()
    }
}

pub fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: values.to_vec(),
        r#type: attribute_type::INTS,
        ..Default::default()
    }
}

pub fn attr_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        f: Some(value),
        r#type: attribute_type::FLOAT,
        ..Default::default()
    }
}

fn value_info(name: &str, elem: Elem, dims: &[Dim<'_>]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: elem.code(),
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            value: Some(match d {
                                Dim::Fixed(n) => dimension::Value::DimValue(*n),
                                Dim::Named(s) => dimension::Value::DimParam((*s).into()),
                            }),
                        })
                        .collect(),
                }),
            }),
        }),
    }
}

/// Builds one graph node by node.
#[derive(Default)]
pub struct GraphBuilder {
    graph: GraphProto,
    next: usize,
}

impl GraphBuilder {
    pub fn new(name: &str) -> Self {
        GraphBuilder {
            graph: GraphProto {
                name: name.into(),
                ..Default::default()
            },
            next: 0,
        }
    }

    pub fn input(&mut self, name: &str, elem: Elem, dims: &[Dim<'_>]) -> String {
        self.graph.input.push(value_info(name, elem, dims));
        name.into()
    }

    pub fn output(&mut self, name: &str, elem: Elem, dims: &[Dim<'_>]) {
        self.graph.output.push(value_info(name, elem, dims));
    }

    /// A float32 weight.
    pub fn weight(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        assert_eq!(dims.iter().product::<usize>(), values.len(), "{name}");
        self.graph.initializer.push(TensorProto {
            dims: dims.iter().map(|d| *d as i64).collect(),
            data_type: data_type::FLOAT,
            name: name.into(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        name.into()
    }

    /// An int64 constant (axes, shapes).
    pub fn ints(&mut self, name: &str, values: &[i64]) -> String {
        self.graph.initializer.push(TensorProto {
            dims: vec![values.len() as i64],
            data_type: data_type::INT64,
            name: name.into(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        name.into()
    }

    /// Adds a node; its single output gets a fresh name, or `output`.
    pub fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
        output: Option<&str>,
    ) -> String {
        self.next += 1;
        let out = output.map_or_else(
            || format!("{}_{}", op.to_lowercase(), self.next),
            str::to_owned,
        );
        self.graph.node.push(NodeProto {
            input: inputs.iter().map(|s| (*s).to_owned()).collect(),
            output: vec![out.clone()],
            name: format!("{op}_{}", self.next),
            op_type: op.into(),
            attribute: attributes,
            domain: String::new(),
        });
        out
    }

    /// `y = x W^T + b` with `W` as `[out, in]` (candle's `Linear` layout).
    pub fn linear(&mut self, x: &str, prefix: &str, w: (&[usize], &[f32]), b: &[f32]) -> String {
        let w = self.weight(&format!("{prefix}.weight"), w.0, w.1);
        let b = self.weight(&format!("{prefix}.bias"), &[b.len()], b);
        self.node("Gemm", &[x, &w, &b], vec![attr_int("transB", 1)], None)
    }

    /// L2-normalises the rows of `x` (`[batch, dim]`) into graph output `name`.
    pub fn unit_vectors_out(&mut self, x: &str, name: &str, dim: usize) {
        self.node(
            "LpNormalization",
            &[x],
            vec![attr_int("axis", 1), attr_int("p", 2)],
            Some(name),
        );
        self.output(
            name,
            Elem::F32,
            &[Dim::Named("batch"), Dim::Fixed(dim as i64)],
        );
    }

    /// The finished model.
    pub fn finish(self, doc: &str, metadata: &[(&str, String)]) -> ModelProto {
        ModelProto {
            ir_version: IR_VERSION,
            producer_name: "kalon".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            domain: String::new(),
            model_version: 1,
            doc_string: doc.into(),
            graph: Some(self.graph),
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            metadata_props: metadata
                .iter()
                .map(|(k, v)| StringStringEntryProto {
                    key: (*k).into(),
                    value: v.clone(),
                })
                .collect(),
        }
    }
}

/// Serializes a model to `.onnx` bytes.
pub fn to_bytes(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}
