//! The reference two-tower model, defined in candle.
//!
//! Image tower: three 3x3 stride-2 convolutions with ReLU, global pooling
//! (the per-channel mean, and with [`Pooling::MeanStd`] also the per-channel
//! standard deviation), a linear projection, L2 normalisation. Text tower: word
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
    /// How the last convolution's feature map becomes one vector (models
    /// written before this setting existed pooled the mean).
    #[serde(default)]
    pub pooling: Pooling,
}

/// Global pooling of the image tower's last feature map `[n, c, h, w]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pooling {
    /// The per-channel mean: `[n, c]`.
    #[default]
    Mean,
    /// The per-channel mean and standard deviation, concatenated: `[n, 2c]`.
    /// The spread of a channel over the image (contrast, texture, noise)
    /// carries much of what the simulated world's beauty depends on, which
    /// an average washes out (docs/ALGORITHM.md, "Can the tower's shape see
    /// beauty at all?").
    MeanStd,
}

impl Pooling {
    pub const ALL: [Pooling; 2] = [Pooling::Mean, Pooling::MeanStd];

    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::MeanStd => "mean-std",
        }
    }

    /// Pooled features per channel of the feature map.
    pub fn width(self) -> usize {
        match self {
            Pooling::Mean => 1,
            Pooling::MeanStd => 2,
        }
    }
}

/// The one of `all` whose `name` is `s`; else an error naming the choices
/// (`what`: what the name is of). Serves the name-parsed enums of the
/// command line: [`Pooling`] here, kalon-align's adapter kinds.
pub fn parse_name<T: Copy>(
    s: &str,
    all: &[T],
    name: fn(T) -> &'static str,
    what: &str,
) -> Result<T, String> {
    all.iter().copied().find(|&v| name(v) == s).ok_or_else(|| {
        let names: Vec<&str> = all.iter().map(|&v| name(v)).collect();
        format!("unknown {what} {s:?} (one of: {})", names.join(", "))
    })
}

impl std::str::FromStr for Pooling {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_name(s, &Self::ALL, Self::name, "pooling")
    }
}

impl std::fmt::Display for Pooling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Added to the variance before its square root, so the gradient stays
/// finite where a channel is constant (a ReLU that is off everywhere).
const STD_EPS: f32 = 1e-5;

impl ModelConfig {
    /// The reference model's sizes, with mean pooling (what a config
    /// without the setting means); pretraining sets its own
    /// ([`crate::train::PretrainConfig`]'s, mean-std by default).
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
            pooling: Pooling::Mean,
        }
    }

    /// The reference sizes with another pooling.
    pub fn with_pooling(self, pooling: Pooling) -> Self {
        ModelConfig { pooling, ..self }
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
    pooling: Pooling,
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
            proj: candle_nn::linear(channels * config.pooling.width(), config.dim, vb.pp("proj"))?,
            pooling: config.pooling,
            size: config.image_size,
            dim: config.dim,
        })
    }

    /// The trunk before the projection: pooled features
    /// `[n, channels * pooling.width()]`.
    pub fn features(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = pixels.clone();
        for conv in &self.convs {
            x = conv.forward(&x)?.relu()?;
        }
        let mean = x.mean_keepdim(3)?.mean_keepdim(2)?;
        let flat = mean.flatten_from(1)?;
        match self.pooling {
            Pooling::Mean => Ok(flat),
            Pooling::MeanStd => {
                // centred, as the ONNX graph computes it
                let var = x
                    .broadcast_sub(&mean)?
                    .sqr()?
                    .mean(D::Minus1)?
                    .mean(D::Minus1)?;
                let std = (var + STD_EPS as f64)?.sqrt()?;
                Tensor::cat(&[&flat, &std], 1)
            }
        }
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
        let mean = g.node("GlobalAveragePool", &[&x], vec![], None);
        let pooled = match self.pooling {
            Pooling::Mean => mean,
            Pooling::MeanStd => {
                let centred = g.node("Sub", &[&x, &mean], vec![], None);
                let squared = g.node("Mul", &[&centred, &centred], vec![], None);
                let var = g.node("GlobalAveragePool", &[&squared], vec![], None);
                let eps = g.weight("std_eps", &[1], &[STD_EPS]);
                let var = g.node("Add", &[&var, &eps], vec![], None);
                let std = g.node("Sqrt", &[&var], vec![], None);
                g.node("Concat", &[&mean, &std], vec![attr_int("axis", 1)], None)
            }
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_written_before_pooling_existed_read_as_mean_pooling() {
        let mut json = serde_json::to_value(ModelConfig::reference(10)).unwrap();
        json.as_object_mut().unwrap().remove("pooling");
        let config: ModelConfig = serde_json::from_value(json).unwrap();
        assert_eq!(config.pooling, Pooling::Mean);
        let json = serde_json::to_value(ModelConfig::reference(10).with_pooling(Pooling::MeanStd));
        assert_eq!(json.unwrap()["pooling"], "mean-std");
    }

    #[test]
    fn pooling_names_parse_both_ways() {
        for pooling in Pooling::ALL {
            assert_eq!(pooling.to_string().parse::<Pooling>().unwrap(), pooling);
        }
        let unknown = "max".parse::<Pooling>().unwrap_err();
        assert!(unknown.contains("mean, mean-std"), "{unknown}");
    }

    #[test]
    fn std_pooling_sees_the_spread_that_the_mean_washes_out() {
        let device = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let config = ModelConfig::reference(4).with_pooling(Pooling::MeanStd);
        let tower = ImageTower::new(&config, vb).unwrap();
        seeded_init(&varmap, 3).unwrap();
        // a flat image and a striped one: the std half of the features tells them apart
        let flat = Tensor::full(0.5f32, (1, 3, 64, 64), &device).unwrap();
        let stripes: Vec<f32> = (0..3 * 64 * 64)
            .map(|i| if (i / 4) % 2 == 0 { 2.0 } else { -1.0 })
            .collect();
        let stripes = Tensor::from_vec(stripes, (1, 3, 64, 64), &device).unwrap();
        let c = *config.channels.last().unwrap();
        let std_of = |x: &Tensor| values(&tower.features(x).unwrap().narrow(1, c, c).unwrap());
        let flat_std = std_of(&flat).unwrap();
        let stripes_std = std_of(&stripes).unwrap();
        assert!(flat_std.iter().all(|&s| s >= 0.0));
        // a constant image gives a constant map away from the border padding
        let flat_max = flat_std.iter().cloned().fold(0.0f32, f32::max);
        let stripes_max = stripes_std.iter().cloned().fold(0.0f32, f32::max);
        assert!(stripes_max > flat_max, "{stripes_max} vs {flat_max}");
    }
}
