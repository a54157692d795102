using ModelCompression.Pruning;
using ModelCompression.Quantization;
using ModelCompression.Training;

namespace ModelCompression.Samples;

/// <summary>The QuickStart's compression of LeNet-300-100, shared by the QuickStart and the scenarios that start from its result.</summary>
public static class QuickStartRecipe
{
    /// <summary>
    /// Creates the pipeline: 90% of the weights removed by one global magnitude threshold, 5 epochs of fine-tuning
    /// with the masks held (layers that run faster sparse become <c>SparseLinear</c> layers), then int8 weights per
    /// channel for the layers still dense, activations quantized at run time; a step that costs more than one point
    /// of accuracy is rolled back.
    /// </summary>
    /// <param name="seed">The seed.</param>
    /// <returns>The pipeline builder, ready to build.</returns>
    public static CompressionPipelineBuilder Create(int seed = 0) => CompressionPipeline.Create()
        .AddMagnitudePruning(new MagnitudePruningOptions
        {
            Sparsity = 0.9,
            Scope = PruningScope.Global,
            FineTuning = new TrainingOptions { Epochs = 5, Optimizer = OptimizerKind.Sgd, LearningRate = 0.02, Momentum = 0.9, Schedule = new CosineLearningRate() },
        })
        .AddPostTrainingQuantization(QuantizationMode.DynamicInt8)
        .WithAccuracyCheck(maxDrop: 0.01, AccuracyCheckPolicy.SkipStep)
        .WithModelName(ModelZoo.DisplayName(ZooModel.LeNet300100))
        .WithSeed(seed);
}
