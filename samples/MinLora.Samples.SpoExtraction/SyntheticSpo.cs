using MinLora.Glm.Data;

namespace MinLora.Samples.SpoExtraction;

/// <summary>
/// A generator of car-fault sentences in the book's format (<c>{"text", "answer"}</c>) with the book's four relations:
/// 部件故障 (part fault), 性能故障 (performance fault), 组成 (composition) and 检测工具 (detection tool).
/// Deterministic for a seed; the repository ships its output in <c>data/</c>.
/// </summary>
public static class SyntheticSpo
{
    private static readonly string[] Parts = { "发动机", "风扇", "水泵", "刹车片", "变速箱", "离合器", "空调", "转向灯", "雨刮", "蓄电池", "发电机", "起动机", "喷油嘴", "节气门", "散热器", "轮胎", "减震器", "油泵", "火花塞", "正时皮带" };
    private static readonly string[] Symptoms = { "异响", "漏油", "过热", "不工作", "抖动", "损坏", "磨损", "松动", "失灵", "卡滞", "水温高", "低速转动", "不亮", "漏水", "烧蚀" };
    private static readonly string[] Systems = { "制动", "转向", "加速", "怠速", "换挡", "启动", "冷却", "燃油" };
    private static readonly string[] Performance = { "制动距离变长", "转向沉重", "加速无力", "怠速不稳", "换挡冲击", "启动困难", "冷却不良", "油耗增加" };
    private static readonly (string Whole, string[] Pieces)[] Assemblies =
    {
        ("变速箱", new[] { "齿轮", "同步器", "拨叉" }), ("发动机", new[] { "曲轴", "活塞", "气门" }), ("制动系统", new[] { "刹车盘", "刹车片", "分泵" }),
        ("空调系统", new[] { "压缩机", "冷凝器", "蒸发器" }), ("转向系统", new[] { "方向机", "拉杆", "助力泵" }),
    };
    private static readonly string[] Tools = { "诊断仪", "万用表", "压力表", "示波器", "听诊器", "内窥镜" };
    private static readonly string[] Cars = { "一辆轿车", "一辆越野车", "该车", "一辆客车", "这台货车" };
    private static readonly string[] Openers = { "故障现象：", "维修记录：", "车主反映，", "检查发现，", "" };

    /// <summary>Generates <paramref name="count"/> examples.</summary>
    /// <param name="count">How many.</param>
    /// <param name="seed">The seed.</param>
    /// <returns>The examples.</returns>
    public static IReadOnlyList<SpoExample> Generate(int count, int seed)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(count);
        var rng = new Random(seed);
        T Pick<T>(T[] a) => a[rng.Next(a.Length)];
        var result = new List<SpoExample>(count);
        for (int n = 0; n < count; n++)
        {
            var clauses = new List<string>();
            var triples = new List<SpoTriple>();
            int facts = rng.Next(1, 4);
            for (int f = 0; f < facts; f++)
            {
                switch (rng.Next(10))
                {
                    case < 5:
                        {
                            var part = Pick(Parts);
                            var symptom = Pick(Symptoms);
                            clauses.Add(rng.Next(2) == 0 ? $"{part}{symptom}" : $"{part}出现{symptom}");
                            triples.Add(new SpoTriple(part, "部件故障", symptom));
                            break;
                        }
                    case < 7:
                        {
                            int i = rng.Next(Systems.Length);
                            clauses.Add($"{Systems[i]}时{Performance[i]}");
                            triples.Add(new SpoTriple(Systems[i], "性能故障", Performance[i]));
                            break;
                        }
                    case < 9:
                        {
                            var (whole, pieces) = Pick(Assemblies);
                            var piece = Pick(pieces);
                            clauses.Add($"{whole}由{piece}等组成");
                            triples.Add(new SpoTriple(whole, "组成", piece));
                            break;
                        }
                    default:
                        {
                            var part = Pick(Parts);
                            var tool = Pick(Tools);
                            clauses.Add($"用{tool}检测{part}");
                            triples.Add(new SpoTriple(part, "检测工具", tool));
                            break;
                        }
                }
            }
            var text = $"{Pick(Openers)}{Pick(Cars)}{string.Join("，", clauses)}。";
            result.Add(new SpoExample(text, string.Join("\n", triples.Distinct().Select(t => t.ToString()))));
        }
        return result;
    }
}
