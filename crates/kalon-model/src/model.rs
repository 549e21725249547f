//! The reference two-tower model, defined in candle.
//!
//! Image tower: three 3x3 stride-2 convolutions with ReLU, global average
//! pooling, a linear projection, L2 normalisation. Text tower: word
//! embeddings averaged under the attention mask, a ReLU MLP, a linear
//! projection, L2 normalisation. Both write themselves to ONNX with
//! [`ImageTower::to_onnx`] / [`TextTower::to_onnx`], op for op the same
//! computation, so candle and ONNX Runtime agree to float rounding.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, Embedding, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::onnx::{self, attr_int, attr_ints, Dim, Elem, GraphBuilder};
use kalon_encoder::contract::{ATTENTION_MASK, IMAGE_EMBEDS, INPUT_IDS, PIXEL_VALUES, TEXT_EMBEDS};

/// Sizes of the reference model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub image_size: usize,
    /// Output channels of each stride-2 convolution.
    pub channels: Vec<usize>,
    pub vocab_size: usize,
    pub max_len: usize,
    pub text_width: usize,
    pub text_hidden: usize,
    /// Embedding dimension of both towers.
    pub dim: usize,
    /// Pixel normalisation (CLIP's constants).
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl ModelConfig {
    pub fn reference(vocab_size: usize) -> Self {
        ModelConfig {
            image_size: 64,
            channels: vec![16, 32, 64],
            vocab_size,
            max_len: 16,
            text_width: 64,
            text_hidden: 128,
            dim: 64,
            mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
        }
    }
}

fn l2_normalise(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(1)?.sqrt()?)
}

fn values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()
}

fn conv_config() -> Conv2dConfig {
    Conv2dConfig {
        padding: 1,
        stride: 2,
        ..Default::default()
    }
}

pub struct ImageTower {
    convs: Vec<Conv2d>,
    proj: Linear,
    size: usize,
    dim: usize,
}

impl ImageTower {
    pub fn new(config: &ModelConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let mut convs = Vec::new();
        let mut channels = 3;
        for (i, &out) in config.channels.iter().enumerate() {
            convs.push(candle_nn::conv2d(
                channels,
                out,
                3,
                conv_config(),
                vb.pp(format!("conv{i}")),
            )?);
            channels = out;
        }
        Ok(ImageTower {
            convs,
            proj: candle_nn::linear(channels, config.dim, vb.pp("proj"))?,
            size: config.image_size,
            dim: config.dim,
        })
    }

    /// The trunk before the projection: pooled features `[n, channels]`.
    pub fn features(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = pixels.clone();
        for conv in &self.convs {
            x = conv.forward(&x)?.relu()?;
        }
        x.mean(D::Minus1)?.mean(D::Minus1)
    }

    /// `[n, 3, size, size]` -> unit vectors `[n, dim]`.
    pub fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        l2_normalise(&self.proj.forward(&self.features(pixels)?)?)
    }

    /// The same computation as an ONNX graph.
    pub fn to_onnx(&self) -> candle_core::Result<onnx::proto::ModelProto> {
        let s = self.size as i64;
        let mut g = GraphBuilder::new("kalon_image_tower");
        let mut x = g.input(
            PIXEL_VALUES,
            Elem::F32,
            &[
                Dim::Named("batch"),
                Dim::Fixed(3),
                Dim::Fixed(s),
                Dim::Fixed(s),
            ],
        );
        for (i, conv) in self.convs.iter().enumerate() {
            let w = conv.weight();
            let w = g.weight(&format!("conv{i}.weight"), w.dims(), &values(w)?);
            let bias = conv.bias().expect("convolutions have a bias");
            let b = g.weight(&format!("conv{i}.bias"), bias.dims(), &values(bias)?);
            let y = g.node(
                "Conv",
                &[&x, &w, &b],
                vec![
                    attr_ints("kernel_shape", &[3, 3]),
                    attr_ints("strides", &[2, 2]),
                    attr_ints("pads", &[1, 1, 1, 1]),
                ],
                None,
            );
            x = g.node("Relu", &[&y], vec![], None);
        }
        let pooled = g.node("GlobalAveragePool", &[&x], vec![], None);
        let flat = g.node("Flatten", &[&pooled], vec![attr_int("axis", 1)], None);
        let w = self.proj.weight();
        let b = self.proj.bias().expect("projection has a bias");
        let y = g.linear(&flat, "proj", (w.dims(), &values(w)?), &values(b)?);
        g.unit_vectors_out(&y, IMAGE_EMBEDS, self.dim);
        Ok(g.finish("Kalon reference image tower", &[]))
    }
}

pub struct TextTower {
    embedding: Embedding,
    hidden: Linear,
    proj: Linear,
    max_len: usize,
    dim: usize,
}

impl TextTower {
    pub fn new(config: &ModelConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(TextTower {
            embedding: candle_nn::embedding(
                config.vocab_size,
                config.text_width,
                vb.pp("embedding"),
            )?,
            hidden: candle_nn::linear(config.text_width, config.text_hidden, vb.pp("hidden"))?,
            proj: candle_nn::linear(config.text_hidden, config.dim, vb.pp("proj"))?,
            max_len: config.max_len,
            dim: config.dim,
        })
    }

    /// int64 ids and mask `[n, max_len]` -> unit vectors `[n, dim]`.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let mask = mask.to_dtype(DType::F32)?;
        let words = self.embedding.forward(ids)?;
        let summed = words.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
        let count = mask.sum_keepdim(1)?.maximum(1f32)?;
        let mean = summed.broadcast_div(&count)?;
        let h = self.hidden.forward(&mean)?.relu()?;
        l2_normalise(&self.proj.forward(&h)?)
    }

    /// The same computation as an ONNX graph.
    pub fn to_onnx(&self) -> candle_core::Result<onnx::proto::ModelProto> {
        let len = self.max_len as i64;
        let mut g = GraphBuilder::new("kalon_text_tower");
        let dims = [Dim::Named("batch"), Dim::Fixed(len)];
        let ids = g.input(INPUT_IDS, Elem::I64, &dims);
        let mask = g.input(ATTENTION_MASK, Elem::I64, &dims);
        let table = self.embedding.embeddings();
        let table = g.weight("embedding.weight", table.dims(), &values(table)?);
        let words = g.node("Gather", &[&table, &ids], vec![attr_int("axis", 0)], None);
        let maskf = g.node("Cast", &[&mask], vec![attr_int("to", 1)], None);
        let axis2 = g.ints("axis_2", &[2]);
        let axis1 = g.ints("axis_1", &[1]);
        let mask3 = g.node("Unsqueeze", &[&maskf, &axis2], vec![], None);
        let masked = g.node("Mul", &[&words, &mask3], vec![], None);
        let summed = g.node(
            "ReduceSum",
            &[&masked, &axis1],
            vec![attr_int("keepdims", 0)],
            None,
        );
        let count = g.node(
            "ReduceSum",
            &[&maskf, &axis1],
            vec![attr_int("keepdims", 1)],
            None,
        );
        let one = g.weight("one", &[1], &[1.0]);
        let count = g.node("Max", &[&count, &one], vec![], None);
        let mean = g.node("Div", &[&summed, &count], vec![], None);
        let (w, b) = (self.hidden.weight(), self.hidden.bias().expect("bias"));
        let h = g.linear(&mean, "hidden", (w.dims(), &values(w)?), &values(b)?);
        let h = g.node("Relu", &[&h], vec![], None);
        let (w, b) = (self.proj.weight(), self.proj.bias().expect("bias"));
        let y = g.linear(&h, "proj", (w.dims(), &values(w)?), &values(b)?);
        g.unit_vectors_out(&y, TEXT_EMBEDS, self.dim);
        Ok(g.finish("Kalon reference text tower", &[]))
    }
}

/// Both towers and the learned temperature of the contrastive loss.
pub struct TwoTower {
    pub config: ModelConfig,
    pub image: ImageTower,
    pub text: TextTower,
    /// log of the logit scale (CLIP's learnable temperature).
    pub log_scale: Tensor,
}

impl TwoTower {
    pub fn new(config: ModelConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let image = ImageTower::new(&config, vb.pp("image"))?;
        let text = TextTower::new(&config, vb.pp("text"))?;
        let log_scale = vb.get_with_hints(
            (),
            "log_scale",
            candle_nn::Init::Const((1.0f64 / 0.07).ln()),
        )?;
        Ok(TwoTower {
            config,
            image,
            text,
            log_scale,
        })
    }

    pub fn device(&self) -> &Device {
        self.log_scale.device()
    }
}

/// Re-draws every weight of `varmap` from a generator seeded with `seed`
/// (candle's CPU device cannot be seeded), with candle's own initial
/// distributions: embeddings N(0, 1); weights and biases of convolutions and
/// linear layers U(-1/sqrt(fan_in), 1/sqrt(fan_in)); constants untouched.
pub fn seeded_init(varmap: &candle_nn::VarMap, seed: u64) -> candle_core::Result<()> {
    use rand::{Rng, SeedableRng};
    let vars = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for name in names {
        let var = &vars[name];
        let n = var.elem_count();
        let values: Vec<f32> = if name.ends_with("embedding.weight") {
            (0..n).map(|_| kalon_normal(&mut rng)).collect()
        } else if let Some(prefix) = name.strip_suffix(".weight").or(name.strip_suffix(".bias")) {
            let weight = &vars[&format!("{prefix}.weight")];
            let fan_in: usize = weight.dims()[1..].iter().product();
            let bound = 1.0 / (fan_in as f32).sqrt();
            (0..n).map(|_| rng.random_range(-bound..bound)).collect()
        } else {
            continue;
        };
        var.set(&Tensor::from_vec(values, var.shape(), var.device())?)?;
    }
    Ok(())
}

/// A standard normal draw (Box-Muller).
fn kalon_normal(rng: &mut impl rand::Rng) -> f32 {
    let u: f32 = rng.random_range(f32::EPSILON..1.0);
    let v: f32 = rng.random();
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
}
