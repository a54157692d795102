namespace ModelCompression.Metrics;

/// <summary>The Pareto front of a trade-off: the settings no other setting beats on both accuracy and cost.</summary>
public static class ParetoFront
{
    /// <summary>
    /// Returns the items that no other item matches or beats on both accuracy (higher is better) and cost (lower is
    /// better) while strictly beating on one, by ascending cost.
    /// </summary>
    /// <typeparam name="T">The item type.</typeparam>
    /// <param name="items">The measured settings.</param>
    /// <param name="accuracy">An item's accuracy.</param>
    /// <param name="cost">An item's cost (bytes, milliseconds, …).</param>
    /// <returns>The front, cheapest first.</returns>
    public static IReadOnlyList<T> Of<T>(IEnumerable<T> items, Func<T, double> accuracy, Func<T, double> cost)
    {
        ArgumentNullException.ThrowIfNull(items);
        ArgumentNullException.ThrowIfNull(accuracy);
        ArgumentNullException.ThrowIfNull(cost);
        var all = items.ToList();
        return all
            .Where(p => !all.Any(q => accuracy(q) >= accuracy(p) && cost(q) <= cost(p) && (accuracy(q) > accuracy(p) || cost(q) < cost(p))))
            .OrderBy(cost)
            .ToList();
    }
}
